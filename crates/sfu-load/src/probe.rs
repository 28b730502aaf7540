//! What the benchmark reads of a process from /proc: its CPU time and resident memory.

use std::{fs, io};

pub struct Process {
    /// `/proc/<pid>` or `/proc/self`.
    dir: String,
}

impl Process {
    pub fn new(pid: u32) -> Self {
        Self { dir: format!("/proc/{pid}") }
    }

    pub fn own() -> Self {
        Self { dir: "/proc/self".into() }
    }

    /// User and system CPU time of all its threads so far, in seconds.
    pub fn cpu_seconds(&self) -> io::Result<f64> {
        let stat = fs::read_to_string(format!("{}/stat", self.dir))?;
        cpu_seconds(&stat, clock_ticks()).ok_or_else(|| io::Error::other(format!("{}/stat is not readable as expected", self.dir)))
    }

    /// Its resident set, in KiB.
    pub fn rss_kib(&self) -> io::Result<u64> {
        let status = fs::read_to_string(format!("{}/status", self.dir))?;
        rss_kib(&status).ok_or_else(|| io::Error::other(format!("{}/status has no VmRSS", self.dir)))
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime (fields 14 and 15 of proc(5)'s stat; the name in field 2 may hold spaces and
/// parentheses, so fields are counted after its last `)`).
fn cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

fn rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix("VmRSS:")).and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The `p` quantile of sorted values (nearest rank).
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(((last as f64) * p).round() as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_past_odd_process_names() {
        let stat = "4242 (janus (x) 1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 9 0 100 1000 500";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("4242 (short) S 1", 100.0), None);
        assert_eq!(rss_kib("Name:\tjanus\nVmRSS:\t   51234 kB\nThreads: 9\n"), Some(51234));
        assert_eq!(rss_kib("Name:\tjanus\n"), None);
        let own = Process::own();
        assert!(own.rss_kib().unwrap() > 0);
        assert!(own.cpu_seconds().unwrap() >= 0.0);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), Some(51));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }
}
