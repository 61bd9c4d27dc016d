//! The bus's receiving rules (`forkless_bus::channel::next_frame`) on arbitrary bytes arriving
//! in arbitrary pieces, with descriptors arriving beside them: never a panic, never a frame
//! that takes more bytes or fds than there are, and every decoded message survives a round
//! trip through the codec (and, carrying a manifest, its validation runs without panicking).
#![no_main]

use forkless_bus::channel::next_frame;
use forkless_bus::{codec, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first bytes say how the stream is cut into reads and how many fds come with each.
    let Some((&plan, rest)) = data.split_first() else { return };
    let piece = usize::from(plan & 0x3f) + 1;
    let fds_per_read = usize::from(plan >> 6);
    let mut inbox = Vec::new();
    let mut queued_fds = 0usize;
    for chunk in rest.chunks(piece) {
        inbox.extend_from_slice(chunk);
        queued_fds += fds_per_read;
        loop {
            match next_frame(&inbox, queued_fds) {
                Ok(Some(frame)) => {
                    assert!(frame.bytes >= 4 && frame.bytes <= inbox.len());
                    assert!(frame.fds <= queued_fds);
                    assert_eq!(frame.fds, frame.message.fd_count());
                    check(&frame.message);
                    inbox.drain(..frame.bytes);
                    queued_fds -= frame.fds;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

fn check(message: &Message) {
    let bytes = codec::encode(message).expect("a decoded message encodes");
    let back: Message = codec::decode(&bytes).expect("an encoded message decodes");
    assert_eq!(&back, message);
    let _ = message.kind();
    let _ = message.check_hello();
    if let Message::Publish { manifest, .. }
    | Message::Generation { manifest, .. }
    | Message::Offer { manifest, .. }
    | Message::Adopt { manifest, .. } = message
    {
        let _ = manifest.validate();
        let _ = manifest.total_bytes();
    }
}
