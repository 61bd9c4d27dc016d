//! The worker's side of the bus after `Ready` (the table in `forkless_bus::wire`): heartbeats
//! out; hot swaps in, in two phases so that a service can refuse weights it cannot use:
//!
//! - `Offer{manifest}` + fds: map the generation and run the service's checks on it, without
//!   serving it; answer `Accepted` or `Rejected{reason}`. The offer is kept (mapped) until…
//! - `Commit{generation}`: it becomes current between requests (a request keeps the generation
//!   it started with), and the old one is unmapped, and reported `Released`, once its last
//!   request ends; or
//! - `Abort{generation, reason}`: it is dropped, and reported `Released`.
//!
//! A `Generation{manifest}` after `Ready` (the one-phase push of a supervisor without offers)
//! is checked the same way and switched to at once if accepted; a refused one is released.
//! The bus closing means the supervisor is gone: the worker drains.

use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use forkless_bus::channel::RecvError;
use forkless_bus::wire::LaneSettings;
use forkless_bus::{BusStream, Manifest, Message};
use tokio_util::sync::CancellationToken;

use crate::accept::Checks;
use crate::{map_generation, Generation, Generations, Gpu, Requests};

/// A generation offered by a hot swap, waiting for `Commit` or `Abort`.
#[derive(Debug)]
pub(crate) struct Offered {
    number: u64,
    /// `None` when it could not even be mapped (and so was rejected).
    generation: Option<Generation>,
    /// The service's checks passed: only then may it be committed.
    accepted: bool,
}

pub(crate) struct SupervisorLink {
    pub(crate) gpu: Option<Gpu>,
    pub(crate) checks: Arc<Checks>,
    pub(crate) heartbeat: Option<std::time::Duration>,
    pub(crate) requests: Requests,
    pub(crate) bus: BusStream,
    pub(crate) generations: Generations,
    pub(crate) notice: tokio::sync::mpsc::UnboundedSender<u64>,
    pub(crate) released: tokio::sync::mpsc::UnboundedReceiver<u64>,
    pub(crate) offered: Option<Offered>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) fault: Arc<OnceLock<String>>,
    /// How the service runs lane passes: a runner starts for every generation committed.
    pub(crate) lane_pass: Option<crate::lane::PassFactory>,
}

/// What to do after handling one message from the supervisor.
type Step = Result<(), String>;

impl SupervisorLink {
    pub(crate) async fn run(mut self) {
        let mut beat = self.heartbeat.map(tokio::time::interval);
        loop {
            let tick = async {
                match beat.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                _ = tick => self.send(Message::Heartbeat { requests: self.requests.served() }).await,
                received = self.bus.recv() => match received {
                    Ok((message, fds)) => self.handle(message, fds).await,
                    Err(RecvError::Closed) => return self.end("the supervisor closed the bus"),
                    Err(e) => return self.end(&format!("bus error: {e}")),
                },
                Some(generation) = self.released.recv() => {
                    tracing::info!(generation, "generation {generation} released");
                    self.send(Message::Released { generation }).await
                }
                _ = self.shutdown.cancelled() => return,
            };
            if let Err(fault) = step {
                let _ = self.fault.set(fault.clone());
                return self.end(&fault);
            }
        }
    }

    async fn send(&mut self, message: Message) -> Step {
        self.bus.send(&message, &[]).await.map_err(|e| format!("bus error: {e}"))
    }

    async fn handle(&mut self, message: Message, fds: Vec<OwnedFd>) -> Step {
        match message {
            Message::Offer { manifest, lane } => self.offer(manifest, fds, lane).await,
            Message::Commit { generation } => self.commit(generation),
            Message::Abort { generation, reason } => self.abort(generation, &reason).await,
            Message::Generation { manifest, lane } => {
                self.push(manifest, fds, lane);
                Ok(())
            }
            other => Err(format!("unexpected {} from the supervisor", other.kind())),
        }
    }

    /// Maps and checks an offered generation; answers whether this service can serve it.
    async fn offer(&mut self, manifest: Manifest, fds: Vec<OwnedFd>, lane: Option<LaneSettings>) -> Step {
        let number = manifest.generation;
        if let Some(stale) = self.offered.take() {
            tracing::warn!(generation = stale.number, "offer of generation {} replaced by {number}", stale.number);
            self.forget(stale);
        }
        let (generation, verdict) = self.map_and_check(manifest, fds, lane);
        self.offered = Some(Offered { number, generation, accepted: verdict.is_ok() });
        match verdict {
            Ok(()) => {
                tracing::info!(generation = number, "accepted the offer of generation {number}");
                self.send(Message::Accepted { generation: number }).await
            }
            Err(reason) => {
                tracing::warn!(generation = number, "rejected the offer of generation {number}: {reason}");
                self.send(Message::Rejected { generation: number, reason }).await
            }
        }
    }

    /// The generation mapped (if it could be) and the service's verdict on it.
    fn map_and_check(
        &self,
        manifest: Manifest,
        fds: Vec<OwnedFd>,
        lane: Option<LaneSettings>,
    ) -> (Option<Generation>, Result<(), String>) {
        let number = manifest.generation;
        match map_generation(manifest, fds, lane, self.gpu.as_ref()) {
            Ok(generation) => {
                let generation = generation.notify_release(self.notice.clone());
                let verdict = self.checks.check(&generation);
                (Some(generation), verdict)
            }
            Err(e) => (None, Err(format!("cannot map generation {number}: {e}"))),
        }
    }

    /// Serves the accepted offer from the next request on.
    fn commit(&mut self, number: u64) -> Step {
        match self.offered.take() {
            Some(Offered { number: offered, generation: Some(next), accepted: true }) if offered == number => {
                let next = Arc::new(next);
                crate::lane::spawn_runner(&next, self.lane_pass.as_ref());
                let previous = self.generations.replace(next);
                tracing::info!(generation = number, previous = previous.number(), "switched to generation {number}");
                Ok(())
            }
            other => {
                let what = match &other {
                    Some(o) if o.number == number => "it was rejected",
                    Some(_) | None => "it was not offered",
                };
                Err(format!("the supervisor committed generation {number}, but {what}: protocol error, exiting"))
            }
        }
    }

    /// Drops a withdrawn offer; it is reported released once unmapped.
    async fn abort(&mut self, number: u64, reason: &str) -> Step {
        tracing::info!(generation = number, "offer of generation {number} withdrawn: {reason}");
        match self.offered.take() {
            Some(offered) if offered.number == number => {
                self.forget(offered);
                Ok(())
            }
            other => {
                self.offered = other;
                // Nothing here maps it: say so, so the supervisor never waits on this worker.
                self.send(Message::Released { generation: number }).await
            }
        }
    }

    /// Drops an offer: a mapped one reports itself released when dropped; one that was never
    /// mapped is reported here.
    fn forget(&self, offered: Offered) {
        if offered.generation.is_none() {
            let _ = self.notice.send(offered.number);
        }
    }

    /// A one-phase push: switch at once if the checks accept it, else keep serving the current
    /// one and release the push, so it never pins memory.
    fn push(&mut self, manifest: Manifest, fds: Vec<OwnedFd>, lane: Option<LaneSettings>) {
        let number = manifest.generation;
        match self.map_and_check(manifest, fds, lane) {
            (Some(next), Ok(())) => {
                let next = Arc::new(next);
                crate::lane::spawn_runner(&next, self.lane_pass.as_ref());
                let previous = self.generations.replace(next);
                tracing::info!(generation = number, previous = previous.number(), "switched to generation {number}");
            }
            (mapped, verdict) => {
                let reason = verdict.err().unwrap_or_default();
                tracing::error!("cannot serve generation {number}: {reason}; still serving the current one");
                if mapped.is_none() {
                    let _ = self.notice.send(number);
                }
            }
        }
    }

    fn end(&self, why: &str) {
        tracing::warn!("{why}: draining");
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::{Dtype, LayoutBuilder};

    use super::*;
    use crate::accept::Checks;
    use crate::Expect;

    /// A one-arena host generation with `name` = `[len]` f32 values `value`, numbered `number`.
    fn arena(number: u64, name: &str, len: u64, value: f32) -> (Manifest, OwnedFd) {
        let mut layout = LayoutBuilder::default();
        let offset = layout.push(name, Dtype::F32, vec![len]);
        let (desc, tensors) = layout.finish();
        let writer = ArenaWriter::create("test-arena", desc.size).unwrap();
        writer.write_at(offset, bytemuck::cast_slice(&vec![value; len as usize])).unwrap();
        let sealed = writer.seal().unwrap();
        let mut manifest = Manifest::new("test".into(), vec![desc], tensors);
        manifest.generation = number;
        (manifest, sealed.read_only_fd().unwrap())
    }

    struct Harness {
        supervisor: BusStream,
        generations: Generations,
        shutdown: CancellationToken,
        fault: Arc<OnceLock<String>>,
    }

    impl Harness {
        /// A link serving generation 1 (`bias [4]` = 1.0) that accepts only `bias [4]`.
        fn start() -> Harness {
            let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
            let (notice, released) = tokio::sync::mpsc::unbounded_channel();
            let (manifest, fd) = arena(1, "bias", 4, 1.0);
            let first = map_generation(manifest, vec![fd], None, None).unwrap().notify_release(notice.clone());
            let generations = Generations::new(Arc::new(first));
            let mut checks = Checks::default();
            checks.push(Expect::new().tensor::<f32>("bias", [4]));
            let (shutdown, fault) = (CancellationToken::new(), Arc::new(OnceLock::new()));
            let link = SupervisorLink {
                gpu: None,
                checks: Arc::new(checks),
                heartbeat: None,
                requests: Requests { served: Arc::default(), limit: None, shutdown: shutdown.clone() },
                bus: BusStream::new(ours),
                generations: generations.clone(),
                notice,
                released,
                offered: None,
                shutdown: shutdown.clone(),
                fault: fault.clone(),
                lane_pass: None,
            };
            tokio::spawn(link.run());
            Harness { supervisor: BusStream::new(theirs), generations, shutdown, fault }
        }

        async fn offer(&mut self, number: u64, name: &str, len: u64, value: f32) {
            let (manifest, fd) = arena(number, name, len, value);
            self.supervisor.send(&Message::Offer { manifest, lane: None }, &[fd.as_fd()]).await.unwrap();
        }

        async fn send(&mut self, message: Message) {
            self.supervisor.send(&message, &[]).await.unwrap();
        }

        async fn recv(&mut self) -> Message {
            let guard = std::time::Duration::from_secs(30);
            tokio::time::timeout(guard, self.supervisor.recv()).await.expect("the worker answers").unwrap().0
        }

        fn serving(&self) -> (u64, f32) {
            let current = self.generations.current();
            (current.number(), current.tensor::<f32>("bias").unwrap()[0])
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn an_accepted_offer_is_served_only_once_committed() {
        rt().block_on(async {
            let mut h = Harness::start();
            h.offer(2, "bias", 4, 2.0).await;
            assert_eq!(h.recv().await, Message::Accepted { generation: 2 });
            assert_eq!(h.serving(), (1, 1.0), "an offer is not served before its commit");
            h.send(Message::Commit { generation: 2 }).await;
            assert_eq!(h.recv().await, Message::Released { generation: 1 });
            assert_eq!(h.serving(), (2, 2.0));
        });
    }

    #[test]
    fn a_refused_offer_is_rejected_with_the_reason_and_released_on_abort() {
        rt().block_on(async {
            let mut h = Harness::start();
            h.offer(2, "b2", 4, 2.0).await;
            let Message::Rejected { generation: 2, reason } = h.recv().await else { panic!("not rejected") };
            assert!(reason.contains("no tensor \"bias\"") && reason.contains("b2"), "{reason}");
            h.offer(3, "bias", 8, 3.0).await;
            let Message::Rejected { generation: 3, reason } = h.recv().await else { panic!("not rejected") };
            assert!(reason.contains("[8]") && reason.contains("[4]"), "{reason}");
            // The stale offer 2 was dropped when 3 came.
            assert_eq!(h.recv().await, Message::Released { generation: 2 });
            h.send(Message::Abort { generation: 3, reason: "worker 0 rejected it".into() }).await;
            assert_eq!(h.recv().await, Message::Released { generation: 3 });
            assert_eq!(h.serving(), (1, 1.0));
            assert!(!h.shutdown.is_cancelled());
        });
    }

    #[test]
    fn an_accepted_offer_can_still_be_aborted() {
        rt().block_on(async {
            let mut h = Harness::start();
            h.offer(2, "bias", 4, 2.0).await;
            assert_eq!(h.recv().await, Message::Accepted { generation: 2 });
            h.send(Message::Abort { generation: 2, reason: "another worker died".into() }).await;
            assert_eq!(h.recv().await, Message::Released { generation: 2 });
            assert_eq!(h.serving(), (1, 1.0));
        });
    }

    #[test]
    fn an_unmappable_offer_is_rejected_and_released_on_abort() {
        rt().block_on(async {
            let mut h = Harness::start();
            let (manifest, _) = arena(2, "bias", 4, 2.0);
            let (pipe, _other) = rustix::pipe::pipe().unwrap(); // not a sealed memfd
            h.supervisor.send(&Message::Offer { manifest, lane: None }, &[pipe.as_fd()]).await.unwrap();
            let Message::Rejected { reason, .. } = h.recv().await else { panic!("not rejected") };
            assert!(reason.contains("cannot map generation 2"), "{reason}");
            h.send(Message::Abort { generation: 2, reason: "rejected".into() }).await;
            assert_eq!(h.recv().await, Message::Released { generation: 2 });
        });
    }

    #[test]
    fn committing_what_was_not_accepted_is_a_protocol_error() {
        rt().block_on(async {
            let mut h = Harness::start();
            h.offer(2, "w2", 4, 2.0).await;
            assert!(matches!(h.recv().await, Message::Rejected { .. }));
            h.send(Message::Commit { generation: 2 }).await;
            let guard = std::time::Duration::from_secs(30);
            tokio::time::timeout(guard, h.shutdown.cancelled()).await.expect("the worker drains");
            let fault = h.fault.get().expect("a fault is recorded");
            assert!(fault.contains("committed generation 2") && fault.contains("rejected"), "{fault}");
            assert_eq!(h.serving(), (1, 1.0));
        });
    }

    #[test]
    fn a_one_phase_push_is_checked_too() {
        rt().block_on(async {
            let mut h = Harness::start();
            let (manifest, fd) = arena(2, "weight", 4, 2.0);
            h.supervisor.send(&Message::Generation { manifest, lane: None }, &[fd.as_fd()]).await.unwrap();
            assert_eq!(h.recv().await, Message::Released { generation: 2 });
            assert_eq!(h.serving(), (1, 1.0));
            let (manifest, fd) = arena(3, "bias", 4, 3.0);
            h.supervisor.send(&Message::Generation { manifest, lane: None }, &[fd.as_fd()]).await.unwrap();
            assert_eq!(h.recv().await, Message::Released { generation: 1 });
            assert_eq!(h.serving(), (3, 3.0));
        });
    }
}
