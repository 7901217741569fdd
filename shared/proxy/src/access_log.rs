//! The access log: one JSON object per line, to stdout or a file.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use weir_config::AccessLog as Target;

pub enum AccessLog {
    Off,
    Stdout,
    File(Mutex<LineWriter<File>>),
}

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub listener: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query string, which may carry secrets.
    pub path: &'a str,
    /// 0 when no response was sent (the client went away).
    pub status: u16,
    /// Response flags (DESIGN.md §3): "NR", "UF", ... or "".
    pub flags: &'a str,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    pub upstream: Option<SocketAddr>,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    /// The config generation that served the request.
    pub generation: u64,
}

impl AccessLog {
    pub fn open(target: &Target) -> std::io::Result<AccessLog> {
        Ok(match target {
            Target::Off => AccessLog::Off,
            Target::Stdout => AccessLog::Stdout,
            Target::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                AccessLog::File(Mutex::new(LineWriter::new(file)))
            }
        })
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(&entry) else {
            return;
        };
        line.push(b'\n');
        // A full disk or closed stdout must not fail requests: the line is dropped.
        let _ = match self {
            AccessLog::Off => Ok(()),
            AccessLog::Stdout => std::io::stdout().lock().write_all(&line),
            AccessLog::File(f) => f.lock().unwrap_or_else(|e| e.into_inner()).write_all(&line),
        };
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}
