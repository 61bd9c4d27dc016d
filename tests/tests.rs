//! End-to-end tests: each starts the real `supervisor` binary, which execs the real owner and
//! `linear-worker` processes, and checks what a user would see.

mod util;

mod backend;
mod chaos;
mod escrow;
mod failures;
mod hardening;
mod hostile;
mod hot_swap;
mod lane;
mod lifecycle;
mod policies;
mod protocol;
mod serving;
mod sharing;
mod structure;
mod trust;
