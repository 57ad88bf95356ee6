//! The admin socket's server side: the socket file (mode 0600, removed when
//! [`AdminSocket`] drops), and one answer per connection: read a line,
//! decode a typed [`Request`], act, and write a [`Response`] whose error
//! carries a stable kind. `top` walks the per-source table through its own
//! map handles, outside the state lock, one walk at a time.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::state::{State, lock};
use crate::{
    admin::{self, AdminError, Request, Response, Top},
    dataplane::maps::MapReader,
};

/// The bound admin socket; dropping it removes the file.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    /// Bind `path` (its directory created), refusing when another keyward
    /// answers there; a stale file from a crash is replaced.
    pub fn bind(path: &Path) -> anyhow::Result<AdminSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("admin socket {} is in use by another keyward", path.display());
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let socket = AdminSocket { listener, path: path.to_owned() };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(socket)
    }

    /// The listener to accept on.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What answering needs: the state, and the map handles `top` walks with.
pub struct Admin {
    pub state: Arc<Mutex<State>>,
    pub reader: Arc<MapReader>,
    /// One `top` walk at a time, however many clients watch.
    walking: Mutex<()>,
}

impl Admin {
    pub fn new(state: Arc<Mutex<State>>, reader: Arc<MapReader>) -> Admin {
        Admin { state, reader, walking: Mutex::new(()) }
    }
}

/// Read one request from `stream` and write its answer.
pub async fn answer(admin: Arc<Admin>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), BufReader::new(r.take(admin::MAX_LINE)).read_line(&mut line))
            .await;
    let result = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            // Off the runtime: verbs take the state lock or walk the table.
            Ok(req) => tokio::task::spawn_blocking(move || dispatch(&admin, req))
                .await
                .unwrap_or_else(|e| Err(AdminError::Internal(e.to_string()))),
            Err(e) => Err(AdminError::BadRequest(format!("bad request: {e}"))),
        },
        Ok(Err(e)) => Err(AdminError::BadRequest(format!("reading request: {e}"))),
        Err(_) => return,
    };
    let resp = match result {
        Ok(data) => Response::Ok { data },
        Err(e) => Response::from(e),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

/// Act on one request.
fn dispatch(admin: &Admin, req: Request) -> Result<serde_json::Value, AdminError> {
    match req {
        Request::Status => json(&lock(&admin.state).status()?),
        Request::Top { n } => {
            let _one = admin.walking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (tracked_sources, sources) = admin.reader.sources(n)?;
            json(&Top { tracked_sources, sources })
        }
        Request::ListShow { list } => json(&lock(&admin.state).list_show(list)?),
        Request::ListAdd { list, cidr, lasting } => json(&lock(&admin.state).list_add(list, cidr, lasting, "manual")?),
        Request::ListAddMany { list, cidrs, lasting } => {
            let n = lock(&admin.state).list_add_many(list, &cidrs, lasting, "manual")?;
            Ok(serde_json::json!({ "added": n }))
        }
        Request::ListRemove { list, cidr } => {
            lock(&admin.state).list_remove(list, cidr)?;
            Ok(serde_json::json!({ "removed": cidr.to_string() }))
        }
        Request::Reload => {
            lock(&admin.state).reload()?;
            Ok(serde_json::json!({ "reloaded": true }))
        }
        Request::Usage { n } => json(&lock(&admin.state).usage(n)?),
    }
}

fn json<T: Serialize>(v: &T) -> Result<serde_json::Value, AdminError> {
    serde_json::to_value(v).map_err(|e| AdminError::Internal(e.to_string()))
}
