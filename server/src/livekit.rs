//! LiveKit's own APIs, which LiveKit and Element Call clients speak to the built-in SFU: the
//! signalling WebSocket and the moderators' RoomService.

pub mod room_service;
pub mod signal;
