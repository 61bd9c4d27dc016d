//! Tests of the lane protocol: the state machine alone, the region's validation, the client and
//! runner in one process, and a property test that runs random interleavings of requester and
//! runner actors over a real lane, killing any of them between any two of its writes.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use proptest::prelude::*;

use super::batcher::{self, Plan, Policy};
use super::*;

const LONG: Duration = Duration::from_secs(20);

fn lane_fd(slots: u32, input: u32, output: u32, processes: u32) -> LaneFd {
    Lane::create("test-lane", LaneLayout { slots, input_capacity: input, output_capacity: output, processes }).unwrap()
}

fn region_of(fd: &LaneFd) -> Region {
    Region::map(fd.fd(), true).unwrap()
}

/// The test's "model": each output byte is its input byte reversed and xored, so an answer
/// carried by the wrong request shows.
fn model(input: &[u8]) -> Vec<u8> {
    input.iter().rev().map(|b| b ^ 0xA5).collect()
}

fn serve_model(batch: &mut Batch<'_>) {
    for i in 0..batch.len() {
        let out = model(batch.input(i));
        batch.set_output(i, &out).unwrap();
    }
}

// --- the state machine ----------------------------------------------------------------------

const ME: Requester = Requester { index: 3, tag: 0xBEEF };
const OTHER: Requester = Requester { index: 4, tag: 0xBEEF };

fn every_state() -> Vec<SlotState> {
    vec![
        SlotState::Free,
        SlotState::Claimed(ME),
        SlotState::Queued(ME),
        SlotState::Taken { epoch: 7 },
        SlotState::Done(ME),
        SlotState::Failed(ME),
    ]
}

fn every_event() -> Vec<Event> {
    let mut events = vec![Event::Take { epoch: 7 }, Event::Reclaim { current: 7 }, Event::Reclaim { current: 8 }];
    for r in [ME, OTHER] {
        events.extend([
            Event::Claim { by: r },
            Event::Publish { by: r },
            Event::Abort { by: r },
            Event::Cancel { by: r },
            Event::Collect { by: r },
        ]);
        for epoch in [7, 8] {
            events.extend([
                Event::Complete { epoch, of: r },
                Event::Fail { epoch, of: r },
                Event::Requeue { current: epoch, of: r },
                Event::GiveUp { current: epoch, of: r },
            ]);
        }
    }
    events
}

#[test]
fn transitions_are_exactly_the_documented_ones() {
    use Event as E;
    use SlotState as S;
    let taken = S::Taken { epoch: 7 };
    let mut legal: Vec<(SlotState, Event, SlotState)> = vec![
        (S::Claimed(ME), E::Publish { by: ME }, S::Queued(ME)),
        (S::Claimed(ME), E::Abort { by: ME }, S::Free),
        (S::Queued(ME), E::Cancel { by: ME }, S::Free),
        (S::Queued(ME), E::Take { epoch: 7 }, taken),
        (S::Done(ME), E::Collect { by: ME }, S::Free),
        (S::Failed(ME), E::Collect { by: ME }, S::Free),
        (taken, E::Reclaim { current: 8 }, S::Free),
    ];
    for r in [ME, OTHER] {
        legal.extend([
            (S::Free, E::Claim { by: r }, S::Claimed(r)),
            (taken, E::Complete { epoch: 7, of: r }, S::Done(r)),
            (taken, E::Fail { epoch: 7, of: r }, S::Failed(r)),
            (taken, E::Requeue { current: 8, of: r }, S::Queued(r)),
            (taken, E::GiveUp { current: 8, of: r }, S::Failed(r)),
        ]);
    }
    for from in [S::Claimed(ME), S::Queued(ME), S::Done(ME), S::Failed(ME)] {
        for current in [7, 8] {
            legal.push((from, E::Reclaim { current }, S::Free));
        }
    }
    for from in every_state() {
        for event in every_event() {
            let expected = legal.iter().find(|(f, e, _)| *f == from && *e == event).map(|(_, _, to)| *to);
            match (transition(from, event), expected) {
                (Ok(to), Some(want)) => assert_eq!(to, want, "{event:?} from {from:?}"),
                (Err(e), None) => assert_eq!(e, IllegalTransition { from, event }),
                (got, want) => panic!("{event:?} from {from:?}: got {got:?}, the table says {want:?}"),
            }
        }
    }
}

#[test]
fn a_stale_holder_cannot_complete_a_live_one_cannot_be_requeued_and_nobody_moves_anothers_slot() {
    let taken = SlotState::Taken { epoch: 5 };
    assert!(transition(taken, Event::Complete { epoch: 4, of: ME }).is_err(), "holder of an older epoch");
    assert!(transition(taken, Event::Requeue { current: 5, of: ME }).is_err(), "the current holder's own request");
    assert!(transition(taken, Event::Reclaim { current: 5 }).is_err(), "mid-pass");
    // Epochs live in 24 bits: the holder of epoch 2^24 + 5 is the holder of 5.
    assert_eq!(transition(taken, Event::Complete { epoch: (1 << 24) + 5, of: ME }), Ok(SlotState::Done(ME)));
    assert!(transition(SlotState::Queued(ME), Event::Cancel { by: OTHER }).is_err());
    assert!(transition(SlotState::Done(ME), Event::Collect { by: OTHER }).is_err());
}

proptest! {
    #[test]
    fn state_words_round_trip(index: u8, tag: u16, epoch in 0u32..(1 << 24)) {
        let r = Requester { index, tag };
        for state in [
            SlotState::Free, SlotState::Queued(r), SlotState::Done(r), SlotState::Failed(r),
            SlotState::Claimed(r), SlotState::Taken { epoch },
        ] {
            prop_assert_eq!(SlotState::decode(state.encode()), Some(state));
        }
    }

    #[test]
    fn any_word_decodes_to_a_state_that_encodes_back_or_is_refused(word: u32) {
        if let Some(state) = SlotState::decode(word) {
            prop_assert_eq!(state.encode(), word);
        }
    }
}

// --- layout and validation --------------------------------------------------------------------

#[test]
fn layouts_out_of_range_are_refused() {
    assert_eq!(LaneLayout::new(0, 1, 1).size(), Err(LayoutError::Slots(0)));
    assert_eq!(LaneLayout::new(MAX_SLOTS + 1, 1, 1).size(), Err(LayoutError::Slots(MAX_SLOTS + 1)));
    assert!(matches!(LaneLayout::new(1, 0, 1).size(), Err(LayoutError::Capacity { .. })));
    assert!(matches!(LaneLayout::new(1, 1, MAX_AREA + 1).size(), Err(LayoutError::Capacity { .. })));
    let mut layout = LaneLayout::new(1, 1, 1);
    layout.processes = MAX_PROCESSES + 1;
    assert_eq!(layout.size(), Err(LayoutError::Processes(MAX_PROCESSES + 1)));
    let size = LaneLayout::new(256, 40_000, 256).size().unwrap();
    assert_eq!(size % 4096, 0);
    assert!(size >= 256 * (40_000 + 256));
}

/// Writes `bytes` at `offset` of the lane memfd (what a hostile or buggy process could do).
fn poke(fd: &LaneFd, offset: usize, bytes: &[u8]) {
    let file = std::fs::File::from(fd.try_clone_fd().unwrap());
    file.write_all_at(bytes, offset as u64).unwrap();
}

#[test]
fn mapping_validates_the_fd_and_the_header() {
    // Not sealed.
    let plain = memfd::MemfdOptions::default().create("x").unwrap();
    plain.as_file().set_len(1 << 20).unwrap();
    assert!(matches!(Region::map(plain.as_file().as_fd(), true), Err(LaneMapError::NotSealed { .. })));

    // Sealed but never initialised.
    let blank = memfd::MemfdOptions::default().allow_sealing(true).create("x").unwrap();
    blank.as_file().set_len(1 << 20).unwrap();
    blank.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow]).unwrap();
    assert!(matches!(Region::map(blank.as_file().as_fd(), true), Err(LaneMapError::Magic)));

    let header_field = |name: &str| match name {
        "version" => std::mem::offset_of!(Header, version),
        "slots" => std::mem::offset_of!(Header, slots),
        "input" => std::mem::offset_of!(Header, input_capacity),
        "total" => std::mem::offset_of!(Header, total_size),
        "mutex" => std::mem::offset_of!(Header, mutex_size),
        _ => unreachable!(),
    };
    type Expect = fn(&LaneMapError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("version", 99u32.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::Version { found: 99 })),
        ("mutex", 8u32.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::MutexSize { .. })),
        ("slots", 1_000_000u32.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::Layout(_))),
        ("slots", 100u32.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::SizeMismatch { .. })),
        ("input", 0u32.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::Layout(_))),
        ("input", (1u32 << 20).to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::SizeMismatch { .. })),
        ("total", 1u64.to_le_bytes().to_vec(), |e| matches!(e, LaneMapError::SizeMismatch { .. })),
    ];
    for (field, bytes, expected) in cases {
        let fd = lane_fd(8, 64, 64, 4);
        poke(&fd, header_field(field), &bytes);
        match Region::map(fd.fd(), true) {
            Err(e) => assert!(expected(&e), "{field}: unexpected error {e}"),
            Ok(_) => panic!("{field} = {bytes:?} was accepted"),
        }
    }

    // A valid lane maps, also read-only, and its fd cannot be resized.
    let fd = lane_fd(8, 64, 64, 4);
    assert!(Region::map(fd.fd(), true).is_ok());
    assert!(LaneMonitor::map(fd.fd()).is_ok());
    let file = std::fs::File::from(fd.try_clone_fd().unwrap());
    assert!(file.set_len(4096).is_err(), "a lane memfd must refuse to shrink");
}

#[test]
fn lengths_read_from_shared_memory_are_bounded_by_the_mapped_layout() {
    let fd = lane_fd(4, 64, 32, 4);
    let region = region_of(&fd);
    let meta_offset =
        |slot: u32, field: usize| region.geo.slots_offset + slot as usize * region.geo.slot_stride + field;
    let me = Owner { index: 1, incarnation: 77, pid: 1 };
    // A hostile process writes absurd lengths into slot 1 and claims it is Done/Taken.
    poke(&fd, meta_offset(1, std::mem::offset_of!(SlotMeta, input_len)), &u32::MAX.to_le_bytes());
    poke(&fd, meta_offset(1, std::mem::offset_of!(SlotMeta, output_len)), &u32::MAX.to_le_bytes());
    poke(&fd, meta_offset(1, std::mem::offset_of!(SlotMeta, reason_len)), &u32::MAX.to_le_bytes());
    let done = SlotState::Done(me.requester()).encode();
    poke(&fd, meta_offset(1, std::mem::offset_of!(SlotMeta, state)), &done.to_le_bytes());
    assert_eq!(region.outcome(1, &me), Some(Outcome::Done(32)));
    // SAFETY: nobody else uses this lane; the slot is not really taken, but no other process
    // exists to write it, which is all the contract needs.
    assert_eq!(unsafe { region.input(1) }.len(), 64);
    let failed = SlotState::Failed(me.requester()).encode();
    poke(&fd, meta_offset(1, std::mem::offset_of!(SlotMeta, state)), &failed.to_le_bytes());
    assert!(matches!(region.outcome(1, &me), Some(Outcome::Failed(r)) if r.len() <= REASON_CAPACITY));
    // Somebody else's slot is never reported as ours.
    let other = Owner { index: 2, incarnation: 77, pid: 1 };
    assert_eq!(region.outcome(1, &other), Some(Outcome::Lost));
    // A word that is no state at all is counted as corrupt and freed by the next sweep.
    poke(&fd, meta_offset(2, std::mem::offset_of!(SlotMeta, state)), &0xDEAD_00FFu32.to_le_bytes());
    assert_eq!(region.stats().slots.corrupt, 1);
    let mut live = Liveness::new(&region);
    assert_eq!(region.sweep_slot(2, 1, 3, &mut live), Swept::Reclaimed);
    assert_eq!(region.stats().slots.corrupt, 0);
}

// --- one process: client and runner -----------------------------------------------------------

fn runner_thread(lane: &Lane, stop: &Arc<AtomicBool>, config: RunnerConfig) -> JoinHandle<RunnerReport> {
    let lane = lane.clone();
    let stop = stop.clone();
    std::thread::spawn(move || lane.run_passes(&stop, &config, serve_model).unwrap())
}

#[test]
fn requests_from_many_threads_are_answered_correctly_in_shared_passes() {
    let fd = lane_fd(32, 64, 64, 8);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let config = RunnerConfig { max_wait: Duration::from_millis(2), ..RunnerConfig::default() };
    let runners: Vec<_> = (0..2).map(|_| runner_thread(&lane, &stop, config.clone())).collect();
    let clients: Vec<_> = (0..8u8)
        .map(|t| {
            let lane = lane.clone();
            std::thread::spawn(move || {
                for n in 0..50u8 {
                    let input = [t, n, 1, 2, 3, t ^ n];
                    let reply = lane.submit(&input).unwrap().wait(LONG).unwrap();
                    assert_eq!(&*reply, model(&input).as_slice());
                }
            })
        })
        .collect();
    clients.into_iter().for_each(|c| c.join().unwrap());
    stop.store(true, Ordering::Release);
    let reports: Vec<_> = runners.into_iter().map(|r| r.join().unwrap()).collect();
    let stats = lane.stats();
    assert_eq!(stats.served, 400);
    assert_eq!(stats.submitted, 400);
    assert_eq!(reports.iter().map(|r| r.served).sum::<u64>(), 400);
    assert_eq!(stats.batch_sizes.iter().sum::<u64>(), stats.passes);
    assert_eq!(stats.processes_per_pass[0], stats.passes, "one process");
    assert_eq!(stats.slots.free, 32, "every slot collected");
    assert_eq!((stats.recoveries, stats.requeued, stats.reclaimed), (0, 0, 0));
}

#[test]
fn async_submitters_await_their_tickets() {
    let fd = lane_fd(16, 16, 16, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = runner_thread(&lane, &stop, RunnerConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..32u8)
            .map(|i| {
                let lane = lane.clone();
                tokio::spawn(async move {
                    let ticket = loop {
                        match lane.submit(&[i, 42]) {
                            Ok(ticket) => break ticket,
                            Err(SubmitError::Full { .. }) => tokio::task::yield_now().await,
                            Err(e) => panic!("{e}"),
                        }
                    };
                    let reply = ticket.await.unwrap();
                    assert_eq!(&*reply, model(&[i, 42]).as_slice());
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    assert_eq!(lane.stats().served, 32);
}

#[test]
fn a_full_lane_and_oversized_inputs_are_refused_at_once() {
    let fd = lane_fd(2, 4, 4, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    assert_eq!(lane.submit(&[0; 5]).unwrap_err(), SubmitError::TooLarge { len: 5, capacity: 4 });
    let first = lane.submit(&[1]).unwrap();
    let second = lane.submit(&[2]).unwrap();
    assert_eq!(lane.submit(&[3]).unwrap_err(), SubmitError::Full { slots: 2 });
    assert_eq!(lane.stats().rejected, 1);
    // Dropping a ticket nobody took withdraws its request and frees its slot.
    drop(first);
    assert_eq!(lane.stats().cancelled, 1);
    let third = lane.submit(&[3]).unwrap();
    assert_eq!(third.wait(Duration::from_millis(20)).unwrap_err(), WaitError::TimedOut(Duration::from_millis(20)));
    drop(second);
    let stats = lane.stats();
    assert_eq!((stats.cancelled, stats.slots.free), (3, 2));
}

#[test]
fn a_panicking_input_writer_gives_its_slot_back() {
    let fd = lane_fd(1, 4, 4, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lane.submit_with(4, |_| panic!("serialisation failed"));
    }));
    assert!(result.is_err());
    assert_eq!(lane.stats().slots.free, 1);
    assert!(lane.submit(&[1]).is_ok());
}

#[test]
fn a_pass_can_fail_requests_and_unanswered_ones_fail() {
    let fd = lane_fd(8, 8, 8, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let lane = lane.clone();
        let stop = stop.clone();
        let config = RunnerConfig { max_batch: 3, max_wait: Duration::from_secs(5), ..RunnerConfig::default() };
        std::thread::spawn(move || {
            lane.run_passes(&stop, &config, |batch| {
                for i in 0..batch.len() {
                    match batch.input(i)[0] {
                        0 => batch.set_output(i, b"ok").unwrap(),
                        1 => batch.fail(i, "bad input"),
                        _ => assert!(batch.set_output(i, &[0; 9]).is_err(), "longer than the output area"),
                    }
                }
            })
            .unwrap()
        })
    };
    let tickets: Vec<_> = (0..3u8).map(|i| lane.submit(&[i]).unwrap()).collect();
    let results: Vec<_> = tickets.into_iter().map(|t| t.wait(LONG).map(|r| r.to_vec())).collect();
    assert_eq!(results[0], Ok(b"ok".to_vec()));
    assert_eq!(results[1], Err(WaitError::Failed("bad input".into())));
    assert_eq!(results[2], Err(WaitError::Failed("the service's pass left this request unanswered".into())));
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    let stats = lane.stats();
    assert_eq!((stats.passes, stats.served, stats.failed), (1, 1, 2));
    assert_eq!(stats.batch_sizes[2], 1, "one pass of 3 (bucket 3-4)");
}

/// Takes the lease and `take`s every queued request on a thread that then exits holding both:
/// what a SIGKILL of the pass runner mid-pass leaves behind. The caller keeps `region` mapped:
/// the kernel marks a dead thread's robust mutexes only where they are still mapped.
fn die_mid_pass(region: &Arc<Region>) -> Vec<u32> {
    let region = region.clone();
    std::thread::spawn(move || {
        assert!(region.lease().try_lock().unwrap().is_some());
        let epoch = region.begin_term(false);
        let mut queued = Vec::new();
        region.queued(&mut queued);
        let slots: Vec<u32> = queued.iter().map(|c| c.slot).collect();
        for &slot in &slots {
            region.take(slot, epoch).unwrap();
            // SAFETY: taken by this thread just above.
            unsafe { region.output_area(slot, 2) }.copy_from_slice(b"XX"); // a partial, wrong output
        }
        slots
    })
    .join()
    .unwrap()
}

#[test]
fn requests_of_a_dead_pass_runner_are_requeued_and_served_once() {
    let fd = lane_fd(8, 8, 8, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let tickets: Vec<_> = (0..3u8).map(|i| lane.submit(&[i, i]).unwrap()).collect();
    let region = Arc::new(region_of(&fd));
    let died = crate::lane::monotonic_ns();
    let taken = die_mid_pass(&region);
    assert_eq!(taken.len(), 3);
    assert_eq!(lane.stats().slots.taken, 3);
    assert_eq!(lane.stats().takeover_pass_ns, 0, "no takeover yet");

    let stop = Arc::new(AtomicBool::new(false));
    let runner = runner_thread(&lane, &stop, RunnerConfig::default());
    for (i, ticket) in tickets.into_iter().enumerate() {
        let reply = ticket.wait(LONG).unwrap();
        assert_eq!(&*reply, model(&[i as u8, i as u8]).as_slice(), "the dead runner's partial output is overwritten");
    }
    stop.store(true, Ordering::Release);
    let report = runner.join().unwrap();
    assert_eq!(report.recoveries, 1);
    let stats = lane.stats();
    assert_eq!((stats.recoveries, stats.requeued, stats.served), (1, 3, 3));
    assert!(stats.takeover_pass_ns > died, "the takeover's first pass is timed on the shared clock");
}

#[test]
fn a_request_that_keeps_killing_runners_fails_instead_of_killing_them_all() {
    let fd = lane_fd(4, 8, 8, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let ticket = lane.submit(b"poison").unwrap();
    let region = Arc::new(region_of(&fd));
    for _ in 0..2 {
        assert_eq!(die_mid_pass(&region).len(), 1);
        // The next holder requeues it (first and second crash)...
        let r = region.clone();
        std::thread::spawn(move || {
            assert_eq!(r.lease().try_lock().unwrap(), Some(Locked::OwnerDied));
            r.lease().make_consistent().unwrap();
            let epoch = r.begin_term(true);
            let mut live = Liveness::new(&r);
            let swept: Vec<_> = (0..r.slots()).map(|s| r.sweep_slot(s, epoch, 3, &mut live)).collect();
            assert!(swept.contains(&Swept::Requeued));
            r.lease().unlock();
        })
        .join()
        .unwrap();
    }
    // ...and after the third death the runner gives up on it.
    assert_eq!(die_mid_pass(&region).len(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = runner_thread(&lane, &stop, RunnerConfig { max_crashes: 3, ..RunnerConfig::default() });
    let error = ticket.wait(LONG).unwrap_err();
    assert_eq!(error, WaitError::Failed("3 pass runners died running this request".into()));
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    assert_eq!(lane.stats().gave_up, 1);
}

#[test]
fn slots_of_a_dead_requester_are_reclaimed_and_its_queued_requests_never_run() {
    let fd = lane_fd(8, 8, 8, 4);
    let region = Arc::new(region_of(&fd));
    // A requester thread registers, claims one slot, queues two requests and dies.
    let r = region.clone();
    std::thread::spawn(move || {
        let owner = r.register().unwrap();
        let claimed = r.claim(&owner, 0).unwrap();
        for input in [b"a", b"b"] {
            let slot = r.claim(&owner, 0).unwrap();
            r.write_request(slot, &owner, 1, |b| b.copy_from_slice(input));
            r.publish(slot, &owner).unwrap();
        }
        let _ = claimed; // left Claimed: died while writing its input
    })
    .join()
    .unwrap();
    assert_eq!(region.stats().slots.queued, 2);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(Mutex::new(0));
    let runner = {
        let (lane, stop, ran) = (lane.clone(), stop.clone(), ran.clone());
        std::thread::spawn(move || {
            lane.run_passes(&stop, &RunnerConfig::default(), |batch| {
                *ran.lock().unwrap() += batch.len();
                serve_model(batch)
            })
        })
    };
    // A live request after the dead ones: served, and by then the sweep has run.
    let reply = lane.submit(b"c").unwrap().wait(LONG).unwrap();
    assert_eq!(&*reply, model(b"c").as_slice());
    drop(reply);
    stop.store(true, Ordering::Release);
    runner.join().unwrap().unwrap();
    assert_eq!(*ran.lock().unwrap(), 1, "the dead requester's requests never ran");
    let stats = lane.stats();
    assert_eq!(stats.reclaimed, 3);
    assert_eq!(stats.requester_deaths, 1);
    assert_eq!(stats.slots.free, 8);
}

#[test]
fn a_pass_that_panics_hands_its_requests_to_the_next_term() {
    let fd = lane_fd(4, 8, 8, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let ticket = lane.submit(b"x").unwrap();
    let stop = AtomicBool::new(false);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lane.run_passes(&stop, &RunnerConfig::default(), |_| panic!("engine bug"))
    }));
    assert!(panicked.is_err());
    let stop = Arc::new(AtomicBool::new(false));
    let runner = runner_thread(&lane, &stop, RunnerConfig::default());
    assert_eq!(&*ticket.wait(LONG).unwrap(), model(b"x").as_slice());
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    let stats = lane.stats();
    assert_eq!((stats.requeued, stats.served, stats.recoveries), (1, 1, 0));
}

#[test]
fn an_idle_holder_lets_another_runner_take_over() {
    let fd = lane_fd(4, 8, 8, 4);
    let lane = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let config =
        RunnerConfig { idle_release: Duration::from_millis(5), poll: Duration::from_millis(5), ..Default::default() };
    let runners: Vec<_> = (0..2).map(|_| runner_thread(&lane, &stop, config.clone())).collect();
    // Wait (bounded) until the lease has changed hands a few times, then check service.
    let mut waited = Duration::ZERO;
    while lane.stats().acquisitions < 4 && waited < LONG {
        std::thread::sleep(Duration::from_millis(5));
        waited += Duration::from_millis(5);
    }
    assert_eq!(&*lane.submit(b"y").unwrap().wait(LONG).unwrap(), model(b"y").as_slice());
    stop.store(true, Ordering::Release);
    let terms: Vec<u64> = runners.into_iter().map(|r| r.join().unwrap().terms).collect();
    assert!(terms.iter().all(|&t| t > 0), "both runners held the lease: {terms:?}");
}

#[test]
fn registrations_are_reused_after_their_process_is_gone() {
    let fd = lane_fd(4, 8, 8, 2);
    let a = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    let b = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    assert!(matches!(Lane::map(fd.try_clone_fd().unwrap()), Err(LaneMapError::TableFull { processes: 2 })));
    let (index, incarnation) = b.registration();
    drop(b);
    let c = Lane::map(fd.try_clone_fd().unwrap()).unwrap();
    assert_eq!(c.registration().0, index);
    assert_ne!(c.registration().1, incarnation, "a new incarnation: the old one's slots are not the new one's");
    drop((a, c));
}

// --- the property test: random interleavings of actors, killed anywhere -----------------------

/// Everything the actors observed, checked after every case.
#[derive(Default)]
struct Log {
    /// Completions (successful `Complete` CAS) per request key (requester, number).
    completions: HashMap<(u32, u32), u32>,
    /// What each requester saw for each of its requests: true = answered, false = withdrawn.
    outcomes: HashMap<(u32, u32), bool>,
    violations: Vec<String>,
}

type SharedLog = Arc<Mutex<Log>>;

fn input_for(requester: u32, number: u32, len: usize) -> Vec<u8> {
    let mut input = requester.to_le_bytes().to_vec();
    input.extend(number.to_le_bytes());
    input.extend((0..len).map(|i| (requester as u8).wrapping_mul(31) ^ (number as u8) ^ i as u8));
    input
}

fn key_of(input: &[u8]) -> (u32, u32) {
    let word =
        |at: usize| u32::from_le_bytes(input.get(at..at + 4).and_then(|b| b.try_into().ok()).unwrap_or([0xFF; 4]));
    (word(0), word(4))
}

/// One step of an actor: at most one write to the lane (a CAS, or the contents of a slot the
/// actor owns), so killing it between steps kills it between any two of its writes.
trait Actor: Send + 'static {
    /// `choice` is a random byte the scheduler passes for the actor's own decisions.
    fn step(&mut self, region: &Region, log: &SharedLog, choice: u8) -> bool;
}

enum Phase {
    Register,
    Claim,
    Write(u32),
    Publish(u32),
    Wait(u32),
    Collect(u32),
    Finished,
}

struct RequesterActor {
    id: u32,
    owner: Option<Owner>,
    total: u32,
    number: u32,
    phase: Phase,
}

impl Actor for RequesterActor {
    fn step(&mut self, region: &Region, log: &SharedLog, choice: u8) -> bool {
        let key = (self.id, self.number);
        self.phase = match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Register => match region.register() {
                Ok(owner) => {
                    self.owner = Some(owner);
                    Phase::Claim
                }
                Err(_) => Phase::Register,
            },
            Phase::Claim if self.number == self.total => Phase::Finished,
            Phase::Claim => match region.claim(self.owner.as_ref().unwrap(), choice as u32) {
                Some(slot) => Phase::Write(slot),
                None => Phase::Claim,
            },
            Phase::Write(slot) => {
                let input = input_for(self.id, self.number, choice as usize % 8);
                region.write_request(slot, self.owner.as_ref().unwrap(), input.len(), |b| b.copy_from_slice(&input));
                Phase::Publish(slot)
            }
            Phase::Publish(slot) => {
                region.publish(slot, self.owner.as_ref().unwrap()).unwrap();
                Phase::Wait(slot)
            }
            Phase::Wait(slot) => match region.outcome(slot, self.owner.as_ref().unwrap()) {
                None if choice < 16 && region.cancel(slot, self.owner.as_ref().unwrap()) => {
                    log.lock().unwrap().outcomes.insert(key, false);
                    self.number += 1;
                    Phase::Claim
                }
                None => Phase::Wait(slot),
                Some(Outcome::Done(len)) => {
                    // SAFETY: Done, ours, not collected yet.
                    let output = unsafe { region.output(slot, len) }.to_vec();
                    let expected = model(&input_for(self.id, self.number, output.len().saturating_sub(8)));
                    let mut log = log.lock().unwrap();
                    if output != expected {
                        log.violations.push(format!("{key:?} got an answer that is not its own"));
                    }
                    if log.outcomes.insert(key, true).is_some() {
                        log.violations.push(format!("{key:?} answered twice"));
                    }
                    Phase::Collect(slot)
                }
                Some(other) => {
                    log.lock().unwrap().violations.push(format!("{key:?} of a live requester ended {other:?}"));
                    Phase::Collect(slot)
                }
            },
            Phase::Collect(slot) => {
                region.collect(slot, self.owner.as_ref().unwrap());
                self.number += 1;
                Phase::Claim
            }
            Phase::Finished => Phase::Finished,
        };
        !matches!(self.phase, Phase::Finished)
    }
}

enum RunPhase {
    Acquire,
    Begin { died: bool },
    Sweep { next: u32 },
    Plan,
    Take { planned: Vec<u32> },
    Write { at: usize },
    Finish { at: usize },
    Notify,
    Release,
}

struct RunnerActor {
    max_batch: usize,
    epoch: u32,
    live: Option<Liveness>,
    taken: Vec<(u32, Requester)>,
    phase: RunPhase,
}

/// High enough that no request gives up in these schedules: a live requester's request must
/// complete. Giving up is tested on its own above.
const NEVER_GIVE_UP: u32 = 1_000;

impl Actor for RunnerActor {
    fn step(&mut self, region: &Region, log: &SharedLog, choice: u8) -> bool {
        let live = self.live.get_or_insert_with(|| Liveness::new(region));
        self.phase = match std::mem::replace(&mut self.phase, RunPhase::Acquire) {
            RunPhase::Acquire => match region.lease().try_lock().unwrap() {
                Some(locked) => {
                    if locked == Locked::OwnerDied {
                        region.lease().make_consistent().unwrap();
                    }
                    RunPhase::Begin { died: locked == Locked::OwnerDied }
                }
                None => RunPhase::Acquire,
            },
            RunPhase::Begin { died } => {
                self.epoch = region.begin_term(died);
                live.forget();
                RunPhase::Sweep { next: 0 }
            }
            RunPhase::Sweep { next } if next == region.slots() => RunPhase::Plan,
            RunPhase::Sweep { next } => {
                region.sweep_slot(next, self.epoch, NEVER_GIVE_UP, live);
                RunPhase::Sweep { next: next + 1 }
            }
            RunPhase::Plan => {
                let mut queued = Vec::new();
                region.queued(&mut queued);
                let policy = Policy { max_batch: self.max_batch, max_wait_ns: 0, linger_ns: 0 };
                match batcher::plan(&mut queued, monotonic_ns(), None, &policy) {
                    Plan::Take => {
                        live.forget();
                        self.taken.clear();
                        RunPhase::Take { planned: queued.iter().rev().map(|c| c.slot).collect() }
                    }
                    _ if choice < 40 => RunPhase::Release,
                    _ if choice < 80 => {
                        live.forget();
                        RunPhase::Sweep { next: 0 }
                    }
                    _ => RunPhase::Plan,
                }
            }
            RunPhase::Take { mut planned } => match planned.pop() {
                None => RunPhase::Write { at: 0 },
                Some(slot) => {
                    if !region.drop_if_orphaned(slot, self.epoch, live) {
                        if let Ok(owner) = region.take(slot, self.epoch) {
                            self.taken.push((slot, owner));
                        }
                    }
                    RunPhase::Take { planned }
                }
            },
            RunPhase::Write { at } if at == self.taken.len() => RunPhase::Finish { at: 0 },
            RunPhase::Write { at } => {
                let slot = self.taken[at].0;
                // SAFETY: taken by this actor's current term; the output area is separate.
                let answer = model(unsafe { region.input(slot) });
                // SAFETY: as above.
                unsafe { region.output_area(slot, answer.len()) }.copy_from_slice(&answer);
                RunPhase::Write { at: at + 1 }
            }
            RunPhase::Finish { at } if at == self.taken.len() => RunPhase::Notify,
            RunPhase::Finish { at } => {
                let slot = self.taken[at].0;
                // SAFETY: still taken by this term.
                let input = unsafe { region.input(slot) }.to_vec();
                if region.finish(slot, self.epoch, Ok(input.len())).is_ok() {
                    let mut log = log.lock().unwrap();
                    let count = log.completions.entry(key_of(&input)).or_default();
                    *count += 1;
                    if *count > 1 {
                        log.violations.push(format!("{:?} completed twice", key_of(&input)));
                    }
                } else {
                    log.lock().unwrap().violations.push(format!("slot {slot}: a live holder's completion failed"));
                }
                RunPhase::Finish { at: at + 1 }
            }
            RunPhase::Notify => {
                for &(_, owner) in &self.taken {
                    region.notify(owner.index as u32);
                }
                region.record_pass(self.taken.len() as u64, 0, 1, Duration::ZERO);
                if choice < 60 {
                    RunPhase::Release
                } else {
                    RunPhase::Plan
                }
            }
            RunPhase::Release => {
                region.lease().unlock();
                RunPhase::Acquire
            }
        };
        true
    }
}

enum Command {
    Step(u8),
    /// Exit the thread at once, unlocking nothing: the kernel marks its robust mutexes
    /// `OWNER_DIED`, exactly as after a SIGKILL.
    Kill,
    /// Release the lease if held (the end of the case), then exit.
    Stop,
}

struct ActorHandle {
    commands: mpsc::Sender<Command>,
    replies: mpsc::Receiver<bool>,
    thread: JoinHandle<()>,
    requester: Option<u32>,
    running: bool,
}

fn spawn_actor(
    region: &Arc<Region>,
    log: &SharedLog,
    mut actor: Box<dyn Actor>,
    requester: Option<u32>,
) -> ActorHandle {
    let (commands, command_rx) = mpsc::channel();
    let (reply_tx, replies) = mpsc::channel();
    let (region, log) = (region.clone(), log.clone());
    let thread = std::thread::spawn(move || {
        while let Ok(command) = command_rx.recv() {
            match command {
                Command::Step(choice) => {
                    let running = actor.step(&region, &log, choice);
                    if reply_tx.send(running).is_err() {
                        return;
                    }
                }
                Command::Kill => {
                    std::mem::forget(actor);
                    return;
                }
                Command::Stop => {
                    // Only a holder's unlock succeeds (glibc checks the owner of robust mutexes).
                    region.lease().unlock();
                    return;
                }
            }
        }
    });
    ActorHandle { commands, replies, thread, requester, running: true }
}

impl ActorHandle {
    fn step(&mut self, choice: u8) {
        self.commands.send(Command::Step(choice)).unwrap();
        self.running = self.replies.recv().unwrap();
    }

    fn end(self, command: Command) {
        self.commands.send(command).unwrap();
        self.thread.join().unwrap();
    }
}

fn runner(max_batch: usize) -> Box<dyn Actor> {
    Box::new(RunnerActor { max_batch, epoch: 0, live: None, taken: Vec::new(), phase: RunPhase::Acquire })
}

fn requester(id: u32, total: u32) -> Box<dyn Actor> {
    Box::new(RequesterActor { id, owner: None, total, number: 0, phase: Phase::Register })
}

#[derive(Debug, Clone)]
struct Case {
    slots: u32,
    requesters: u32,
    runners: u32,
    requests: u32,
    max_batch: usize,
    /// (which actor, the actor's choice byte, kill roll)
    schedule: Vec<(u8, u8, u8)>,
}

fn cases() -> impl Strategy<Value = Case> {
    (1u32..5, 1u32..4, 1u32..3, 1u32..4, 1usize..4, proptest::collection::vec(any::<(u8, u8, u8)>(), 20..300)).prop_map(
        |(slots, requesters, runners, requests, max_batch, schedule)| Case {
            slots,
            requesters,
            runners,
            requests,
            max_batch,
            schedule,
        },
    )
}

/// The lane's state, for a failing case's message.
fn dump(region: &Region) -> String {
    let mut out = format!("epoch {}\n", region.header().epoch.load(Ordering::Relaxed));
    for index in 0..region.layout().processes as usize {
        let e = region.entry(index);
        out += &format!("process {index}: incarnation {}\n", e.incarnation.load(Ordering::Relaxed));
    }
    for slot in 0..region.slots() {
        let m = region.meta(slot);
        out += &format!(
            "slot {slot}: {:?} owner {} incarnation {} seq {} crashes {}\n",
            SlotState::decode(m.state.load(Ordering::Relaxed)),
            m.owner.load(Ordering::Relaxed),
            m.incarnation.load(Ordering::Relaxed),
            m.seq.load(Ordering::Relaxed),
            m.crashes.load(Ordering::Relaxed),
        );
    }
    out
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    // Room for every requester, its replacements and no more: entries must be reused.
    let fd = lane_fd(case.slots, 16, 16, case.requesters + 1);
    let region = Arc::new(region_of(&fd));
    let log: SharedLog = Arc::default();
    let mut actors: Vec<ActorHandle> = Vec::new();
    let mut next_id = 0;
    let mut dead_requesters = Vec::new();
    for _ in 0..case.requesters {
        actors.push(spawn_actor(&region, &log, requester(next_id, case.requests), Some(next_id)));
        next_id += 1;
    }
    for _ in 0..case.runners {
        actors.push(spawn_actor(&region, &log, runner(case.max_batch), None));
    }
    let mut kills = 0;

    // Random interleaving, with kills.
    for &(pick, choice, kill_roll) in &case.schedule {
        let index = pick as usize % actors.len();
        if kill_roll < 8 && kills < 4 {
            kills += 1;
            let victim = actors.swap_remove(index);
            let replacement = match victim.requester {
                Some(id) => {
                    dead_requesters.push(id);
                    next_id += 1;
                    spawn_actor(&region, &log, requester(next_id - 1, case.requests), Some(next_id - 1))
                }
                None => spawn_actor(&region, &log, runner(case.max_batch), None),
            };
            victim.end(Command::Kill);
            actors.push(replacement);
        } else if actors[index].running {
            actors[index].step(choice);
        }
    }

    // Drain: keep stepping everyone (runners keep the lease while there is work) until every
    // live requester is finished. Progress is guaranteed, so a bound only catches livelock.
    let mut rounds = 0;
    while actors.iter().any(|a| a.requester.is_some() && a.running) {
        rounds += 1;
        prop_assert!(rounds < 20_000, "live requesters never finished: a request was lost\n{}", dump(&region));
        for (i, actor) in actors.iter_mut().enumerate() {
            if actor.running {
                // Requesters no longer withdraw; runners still sweep and hand the lease over
                // now and then (as the real runner sweeps every `sweep_interval`).
                actor.step(if actor.requester.is_some() { 255 } else { 40 + ((rounds * 7 + i) % 216) as u8 });
            }
        }
    }
    for actor in actors {
        actor.end(Command::Stop);
    }

    // A last holder sweeps: every slot must be free (the dead requesters' ones reclaimed).
    let final_region = region.clone();
    let leaked = std::thread::spawn(move || {
        let region = final_region;
        let locked = region.lease().try_lock().unwrap();
        assert!(locked.is_some(), "nobody holds the lease any more");
        if locked == Some(Locked::OwnerDied) {
            region.lease().make_consistent().unwrap();
        }
        let epoch = region.begin_term(false);
        let mut live = Liveness::new(&region);
        for slot in 0..region.slots() {
            region.sweep_slot(slot, epoch, NEVER_GIVE_UP, &mut live);
        }
        region.lease().unlock();
        region.slots() - region.stats().slots.free
    })
    .join()
    .unwrap();
    prop_assert_eq!(leaked, 0, "slots leaked past a sweep");

    let log = log.lock().unwrap();
    prop_assert!(log.violations.is_empty(), "{:?}", log.violations);
    for id in (0..next_id).filter(|id| !dead_requesters.contains(id)) {
        for number in 0..case.requests {
            let key = (id, number);
            let completions = log.completions.get(&key).copied().unwrap_or(0);
            match log.outcomes.get(&key) {
                Some(true) => prop_assert_eq!(completions, 1, "{:?} answered but completed {} times", key, completions),
                Some(false) => prop_assert_eq!(completions, 0, "{:?} withdrawn yet completed", key),
                None => prop_assert!(false, "{:?} of a live requester has no outcome", key),
            }
        }
    }
    prop_assert!(log.completions.values().all(|&n| n == 1));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Requesters and runners interleave step by step over a real lane; any of them may be
    /// killed between two steps (its robust mutexes abandoned, as by SIGKILL). Whatever the
    /// schedule: no request completes twice, every answer belongs to its request, every request
    /// of a live requester completes (or was withdrawn by it), and no slot outlives a sweep.
    #[test]
    fn the_queue_survives_any_interleaving_and_any_death(case in cases()) {
        run_case(&case)?;
    }
}
