//! Events that children's slots and the bus report to the supervisor's main loop.

use crate::spawn::ChildLabel;

#[derive(Debug, Clone)]
pub enum Event {
    /// The owner published a generation, now in escrow: `live` (the first), or offered to
    /// the workers (a hot swap).
    Published { generation: u64, source: String, bytes: u64, live: bool },
    /// No worker uses this (older) generation any more: its fds are closed, its memory freed.
    Freed { generation: u64 },
    /// A restarted owner verified and adopted the generation in escrow (no disk read).
    Adopted { generation: u64 },
    /// A worker mapped the generation, warmed up and holds its listener.
    WorkerReady { index: u32, pid: u32, generation: u64, attach: forkless_bus::wire::AttachTiming },
    /// A child died unplanned (crash, hang, failed start); its slot restarts it.
    Crashed { label: ChildLabel },
    /// A slot ended (stopped, scaled away, or given up after a fatal failure).
    SlotEnded { label: ChildLabel },
    /// Something restarting cannot fix: stop everything and exit non-zero with this reason.
    Fatal(String),
    /// A worker on `device` kept failing and the service degrades (`[cuda] on_device_failure =
    /// "degrade"`): that device's workers stop; the others keep serving.
    DeviceFailed { device: u32, reason: String },
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        use crate::events::Event;
        let event = Event::Fatal("owner kept failing".into());
        assert!(matches!(event, Event::Fatal(_)));
    }
}
