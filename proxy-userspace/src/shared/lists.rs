//! The allow and deny lists (manual entries and escalations) shared through
//! the store: written once on any host, applied to every host's XDP maps.
//!
//! Two structures under the site's namespace, written together by one
//! script: a current state (a hash `lists:state`, field `<list> <cidr>`,
//! value the entry or a removal's tombstone, with a sorted set
//! `lists:expiry` of when each field stops mattering, pruned on every write)
//! and a stream of the same changes (`lists:events`, `XADD … MAXLEN ~`).
//! Each host tails the stream with a bounded `XREAD BLOCK` on a connection of
//! its own (never on the request path) from its last position, and reads the
//! whole state at start, after every reconnect, when the stream was trimmed
//! past its position, and once a minute. Not pub/sub: a host that was away
//! catches up from its position or the state.

use std::time::Duration;

use redis::{aio::MultiplexedConnection, streams::StreamReadReply};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::{
    store::{Entry, List},
    units::Cidr,
};

/// Entries the stream keeps (approximately: `MAXLEN ~`).
const STREAM_LEN: i64 = 10_000;
/// How long a removal's tombstone is kept in the state (a host away longer
/// than that and trimmed out of the stream takes the state as it is).
const TOMBSTONE_SECS: i64 = 2 * 86_400;
/// Entries one `XREAD` returns at most.
const READ_COUNT: usize = 256;

/// `KEYS`: stream, state hash, expiry set. `ARGV`: field, entry (JSON),
/// expiry score (`+inf` for none), the stream's length. Prunes what expired
/// by Redis's clock, writes the state, appends to the stream; returns the
/// stream entry's id.
const PUBLISH: &str = r"
local now = redis.call('TIME')[1]
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, f in ipairs(gone) do redis.call('HDEL', KEYS[2], f) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[2])
";

/// `KEYS`: stream, state hash. Returns {the stream's last id (`0-0` when
/// empty), the first id (`0-0` when empty), the state as field, value, …},
/// read at one instant.
const SNAPSHOT: &str = r"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local l, f = '0-0', '0-0'
if #last > 0 then l = last[1][1] end
if #first > 0 then f = first[1][1] end
return {l, f, redis.call('HGETALL', KEYS[2])}
";

/// A change to a list, as written to the state and the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub list: List,
    pub cidr: Cidr,
    /// False: the entry was removed (a tombstone in the state).
    pub present: bool,
    /// When the entry stops applying (Unix seconds), for entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// When it was added or removed (Unix seconds).
    pub at_unix: u64,
    /// The host that wrote it.
    pub origin: String,
    /// Why it is listed there (`manual`, `escalated: daily cap`).
    #[serde(default)]
    pub reason: String,
}

/// Reasons of entries that came from another host start with this.
pub const SHARED_PREFIX: &str = "shared: ";

impl Change {
    /// An entry this host holds, as a change (one that came from another
    /// host keeps its origin and reason).
    pub fn from_entry(list: List, e: &Entry, me: &str) -> Change {
        let reason = e.reason.clone().unwrap_or_default();
        let (origin, reason) = match reason.strip_prefix(SHARED_PREFIX).and_then(|r| r.split_once(": ")) {
            Some((o, r)) => (o.to_owned(), r.to_owned()),
            None => (me.to_owned(), reason),
        };
        Change {
            list,
            cidr: e.cidr,
            present: true,
            expires_unix: e.expires_unix,
            at_unix: e.added_unix.unwrap_or(0),
            origin,
            reason,
        }
    }

    /// A removal by this host.
    pub fn removal(list: List, cidr: Cidr, now: u64, me: &str) -> Change {
        Change {
            list,
            cidr,
            present: false,
            expires_unix: None,
            at_unix: now,
            origin: me.to_owned(),
            reason: String::new(),
        }
    }

    /// The entry to hold locally: its reason names the host it came from.
    pub fn entry(&self) -> Entry {
        Entry {
            cidr: self.cidr,
            expires_unix: self.expires_unix,
            reason: Some(format!("{SHARED_PREFIX}{}: {}", self.origin, self.reason)),
            added_unix: Some(self.at_unix),
        }
    }

    fn field(&self) -> String {
        format!("{} {}", self.list.name(), self.cidr)
    }

    /// Until when the state keeps it: an entry's expiry, a tombstone's two days.
    fn score(&self) -> String {
        match (self.present, self.expires_unix) {
            (true, Some(t)) => t.to_string(),
            (true, None) => "+inf".into(),
            (false, _) => (i64::try_from(self.at_unix).unwrap_or(i64::MAX) + TOMBSTONE_SECS).to_string(),
        }
    }
}

/// The state read at one instant, with the stream's positions.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The stream's newest id: tail from here.
    pub last_id: String,
    /// Entries and tombstones in force.
    pub changes: Vec<Change>,
}

/// Stream ids compare as (milliseconds, sequence).
pub fn id_before(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a) < parse(b)
}

/// The shared lists' keys and scripts over one host's store connection.
pub struct SharedLists {
    publish: redis::Script,
    snapshot: redis::Script,
    stream: String,
    state: String,
    expiry: String,
}

impl SharedLists {
    pub fn new(store: &Store) -> SharedLists {
        SharedLists {
            publish: redis::Script::new(PUBLISH),
            snapshot: redis::Script::new(SNAPSHOT),
            stream: store.key("lists:events"),
            state: store.key("lists:state"),
            expiry: store.key("lists:expiry"),
        }
    }

    /// Write `c` to the state and the stream (one script round trip).
    pub async fn publish(&self, store: &Store, c: &Change) -> Result<String, StoreError> {
        let json = serde_json::to_string(c).unwrap_or_default();
        let keys = [self.stream.clone(), self.state.clone(), self.expiry.clone()];
        store.script(&self.publish, &keys, &[c.field(), json, c.score(), STREAM_LEN.to_string()]).await
    }

    /// The state and the stream's positions, read at one instant; entries
    /// and tombstones past their time are left out (`now`, Unix seconds).
    /// Also true when the stream no longer holds `after` (trimmed past it).
    pub async fn snapshot(&self, store: &Store, after: &str, now: u64) -> Result<(Snapshot, bool), StoreError> {
        let keys = [self.stream.clone(), self.state.clone()];
        let (last_id, first_id, flat): (String, String, Vec<String>) =
            store.script(&self.snapshot, &keys, &[] as &[i64]).await?;
        let changes = flat
            .chunks(2)
            .filter_map(|kv| serde_json::from_str::<Change>(kv.get(1)?).ok())
            .filter(|c| !c.present || c.expires_unix.is_none_or(|t| t > now))
            .collect();
        let trimmed = after != "0-0" && id_before(after, &first_id);
        Ok((Snapshot { last_id, changes }, trimmed))
    }

    /// Changes after `after`, waiting up to `block` for one, on a connection
    /// of the tail's own. `None` when nothing came.
    pub async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        after: &str,
        block: Duration,
    ) -> Result<Vec<(String, Option<Change>)>, redis::RedisError> {
        let opts = redis::streams::StreamReadOptions::default()
            .count(READ_COUNT)
            .block(usize::try_from(block.as_millis()).unwrap_or(1000));
        let reply: Option<StreamReadReply> =
            redis::AsyncCommands::xread_options(conn, &[&self.stream], &[after], &opts).await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for id in key.ids {
                let c = id.get::<String>("e").and_then(|s| serde_json::from_str(&s).ok());
                out.push((id.id, c));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_and_shared_reasons_round_trip() {
        assert!(id_before("5-0", "5-1") && id_before("5-9", "10-0") && !id_before("10-0", "10-0"));
        let cidr: Cidr = "10.77.0.2/32".parse().unwrap();
        let e =
            Entry { cidr, expires_unix: Some(99), reason: Some("escalated: daily cap".into()), added_unix: Some(7) };
        let c = Change::from_entry(List::Deny, &e, "a");
        assert_eq!((c.origin.as_str(), c.reason.as_str(), c.at_unix), ("a", "escalated: daily cap", 7));
        let held = c.entry();
        assert_eq!(held.reason.as_deref(), Some("shared: a: escalated: daily cap"));
        // Held on host b, re-published by b after a restart: still a's.
        assert_eq!(Change::from_entry(List::Deny, &held, "b"), c);
        assert_eq!(c.score(), "99");
        assert_eq!(Change::removal(List::Allow, cidr, 100, "b").score(), (100 + TOMBSTONE_SECS).to_string());
    }
}
