//! `dvtest-stall`: a command that never answers, standing in for a hung tool (e.g. an `nft`
//! stuck on the kernel) so tests can check that a caller's timeout kills it. Ignores its
//! arguments and stdin and sleeps until killed; exits on its own after 10 minutes so a
//! caller that failed to kill it does not leave it forever.

use std::time::{Duration, Instant};

fn main() {
    let until = Instant::now() + Duration::from_secs(600);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
    }
}
