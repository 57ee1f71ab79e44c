//! Per-stream state: which directions are open and both flow-control windows.

use crate::flow::{RecvWindow, SendWindow};

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) send: SendWindow,
    pub(crate) recv: RecvWindow,
    /// We sent END_STREAM (half-closed local).
    pub(crate) local_closed: bool,
    /// The peer sent END_STREAM (half-closed remote).
    pub(crate) remote_closed: bool,
    /// Server: response HEADERS sent. Client: always true (the request opened the stream).
    pub(crate) headers_sent: bool,
    /// Client: final response received. Server: always true (the request opened the stream).
    pub(crate) headers_received: bool,
}

impl Stream {
    pub(crate) fn new(send: u32, recv: u32) -> Stream {
        Stream {
            send: SendWindow::new(send),
            recv: RecvWindow::new(recv, recv),
            local_closed: false,
            remote_closed: false,
            headers_sent: false,
            headers_received: false,
        }
    }

    /// Open in at least one direction: counts toward MAX_CONCURRENT_STREAMS.
    //= rfc9113#section-5.1.2
    //# Streams that are in the "open" state or in either of the "half-closed"
    //# states count toward the maximum number of streams that an endpoint is
    //# permitted to open.
    pub(crate) fn is_active(&self) -> bool {
        !(self.local_closed && self.remote_closed)
    }
}
