//! Session configuration: what we advertise and the limits we hold the peer to.

use std::time::Duration;

/// Local settings and limits. [`Settings::default`] is ztunnel's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE). ztunnel: 4 MiB.
    pub initial_stream_window: u32,
    /// Receive window of the connection (raised with a WINDOW_UPDATE on stream 0). ztunnel: 16 MiB.
    pub connection_window: u32,
    /// Largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE). ztunnel: 1 MiB.
    pub max_frame_size: u32,
    /// Streams the peer may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); more are
    /// refused with REFUSED_STREAM. ztunnel's server: 200.
    pub max_concurrent_streams: u32,
    /// HPACK dynamic table size we let the peer use (SETTINGS_HEADER_TABLE_SIZE).
    pub header_table_size: u32,
    /// Largest decoded header list we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// CONTINUATION frames allowed in one header block before ENHANCE_YOUR_CALM.
    pub max_continuation_frames: u32,
    /// RST_STREAM frames the peer may send per second before we close the connection with
    /// ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
    pub max_resets_per_second: u32,
    /// Control frames (PING and SETTINGS acknowledgements, RST_STREAM) the peer may make us
    /// queue while `poll_transmit` is not drained, before ENHANCE_YOUR_CALM.
    pub max_queued_control_frames: u32,
    /// Interval between keepalive PINGs; `None` disables keepalive. ztunnel: 10 s.
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive PING may go unanswered. ztunnel: 20 s.
    pub keepalive_timeout: Duration,
    /// SETTINGS parameters beyond RFC 9113's that we announce, as (identifier, value); take
    /// identifiers from the experimental range 0xf000–0xffff (RFC 9113 §11.3). Every peer
    /// ignores an identifier it does not know (§6.5.2); the peer's own value for one of these
    /// identifiers is kept ([`Session::peer_extension`](crate::Session::peer_extension)).
    pub extensions: Vec<(u16, u32)>,
}

impl Settings {
    /// Upper bound on a header block's encoded size, across HEADERS and CONTINUATION frames.
    /// Huffman coding can make a string at most 30/8 times longer than its text, so four times
    /// the decoded list limit leaves room for any honest encoding.
    pub fn max_header_block_bytes(&self) -> usize {
        (self.max_header_list_size as usize)
            .saturating_mul(4)
            .max(16 * 1024)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            initial_stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_concurrent_streams: 200,
            header_table_size: 4096,
            max_header_list_size: 16 << 10,
            max_continuation_frames: 16,
            max_resets_per_second: 100,
            max_queued_control_frames: 1000,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
            extensions: Vec::new(),
        }
    }
}
