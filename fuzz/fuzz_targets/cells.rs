//! Cells and what they carry in the clear or once opened: the cell header,
//! stream messages, and every protobuf body a cell or stream message holds.
#![no_main]

use ferry_proto::pb;
use ferry_proto::{Cell, StreamMsg, decode_pb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Cell::parse(data) {
        let _ = c.cmd.name();
        let _ = decode_pb::<pb::Destroy>("destroy", c.body);
        let _ = decode_pb::<pb::DrainNotice>("notice", c.body);
        let _ = decode_pb::<pb::Control>("control", c.body);
        let _ = decode_pb::<pb::ControlReply>("control reply", c.body);
    }
    if let Ok(m) = StreamMsg::parse(data) {
        let _ = m.window_ack();
        let _ = decode_pb::<pb::Begin>("begin", m.body);
        let _ = decode_pb::<pb::Connected>("connected", m.body);
        let _ = decode_pb::<pb::End>("end", m.body);
        let _ = decode_pb::<pb::Resume>("resume", m.body);
        let _ = decode_pb::<pb::Resumed>("resumed", m.body);
    }
});
