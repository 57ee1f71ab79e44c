//! What happened: process logging, one access-log record per connection, and the counters
//! served on the metrics port.

pub mod access_log;
pub mod hbone_metrics;
pub mod logging;
pub mod metrics;
