//! End-to-end tests of the client-server API by area (profile, devices, account data, receipts,
//! typing, filters, presence, directory, rate limits, admin registration, metrics).

mod common;
