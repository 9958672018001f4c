//! POST streams that survive a reload: the `method` and `body` options,
//! the resume URL stored under the stream key, their side of `stats()`,
//! and `forgetStream`.
//!
//! The rules (POST once, resume with a GET of the answer's
//! `Content-Location`, 204 is the end) are the core's
//! ([`tidemark_core::stream`]); this module only keeps the URL. It is
//! written, awaited, between the core's `Resumable` item and the first
//! event of the answer, so a reload right after that event resumes
//! instead of posting again. While the record exists the stream key never
//! POSTs again: apps give each request a key of its own (a message id).

use super::js;
use super::runtime::{Runtime, StoreSpec, runtime};
use super::tracker::stream_key_of;
use js_sys::{ArrayBuffer, Uint8Array};
use tidemark_core::{Clock, Connector, RegistryError, ResumableStream, StreamKey};
use wasm_bindgen::prelude::*;

/// The POST body of the `method` and `body` options: `None` for a GET
/// (the default). A POST needs its own `streamKey` (the default key, the
/// URL, would make every POST to one endpoint share a record).
pub(crate) fn body_of(options: &JsValue) -> Result<Option<Vec<u8>>, JsError> {
    let method = js::get_string(options, "method")?;
    let post = match method.as_deref() {
        None => false,
        Some(m) if m.eq_ignore_ascii_case("GET") => false,
        Some(m) if m.eq_ignore_ascii_case("POST") => true,
        Some(other) => {
            return Err(JsError::new(&format!(
                "option `method` must be \"GET\" or \"POST\", not {other:?}"
            )));
        }
    };
    let body = js::get(options, "body");
    if !post {
        return match body {
            Some(_) => Err(JsError::new("option `body` needs `method: \"POST\"`")),
            None => Ok(None),
        };
    }
    if js::get_string(options, "streamKey")?.is_none() {
        return Err(JsError::new(
            "option `streamKey` is required with `method: \"POST\"`: a key of its own for \
             each request (a message id, say), under which its resume URL is kept",
        ));
    }
    Ok(Some(match body {
        None => Vec::new(),
        Some(body) => bytes_of(&body)?,
    }))
}

/// The bytes of a `body`: a string (as UTF-8), an `ArrayBuffer` or an
/// `ArrayBufferView` (`Uint8Array`, `DataView`, ...).
fn bytes_of(body: &JsValue) -> Result<Vec<u8>, JsError> {
    if let Some(text) = body.as_string() {
        return Ok(text.into_bytes());
    }
    if let Some(buffer) = body.dyn_ref::<ArrayBuffer>() {
        return Ok(Uint8Array::new(buffer).to_vec());
    }
    if ArrayBuffer::is_view(body) {
        let field = |name: &str| js::get(body, name);
        let (Some(buffer), Some(offset), Some(length)) = (
            field("buffer"),
            field("byteOffset").and_then(|v| v.as_f64()),
            field("byteLength").and_then(|v| v.as_f64()),
        ) else {
            return Err(JsError::new("option `body`: an unreadable ArrayBufferView"));
        };
        return Ok(Uint8Array::new_with_byte_offset_and_length(
            &buffer,
            offset as u32,
            length as u32,
        )
        .to_vec());
    }
    Err(JsError::new(
        "option `body` must be a string, an ArrayBuffer or an ArrayBufferView (Uint8Array, \
         ...); read a Blob, FormData or stream into one of those first",
    ))
}

/// Before a POST stream opens its tracker: its stored resume URL, if any.
/// Without one the stream will POST, so any cursor left under the key (a
/// run whose answer could not be resumed) is removed first: a new answer's
/// ids must not be taken for replays of an old one.
pub(crate) async fn prepare(runtime: &Runtime, key: &StreamKey) -> Result<Option<String>, String> {
    let store = runtime.registry.store();
    let url = store
        .load_resume_url(key)
        .await
        .map_err(|e| format!("cannot read the stream's resume URL: {e}"))?;
    if url.is_none() {
        match runtime.registry.remove(key).await {
            // Open elsewhere in the page: opening it says so.
            Ok(()) | Err(RegistryError::StillOpen(_)) => {}
            Err(e) => return Err(format!("cannot clear the stream's old cursor: {e}")),
        }
    }
    Ok(url)
}

/// Stores the resume URL of a POST stream; awaited before the answer's
/// first event is delivered. A failed write is warned about and the stream
/// goes on: a reload would then POST again.
pub(crate) async fn persist(runtime: &Runtime, key: &StreamKey, url: &str) {
    let at = tidemark_core::Millis(js_sys::Date::now() as u64);
    if let Err(error) = runtime.registry.store().save_resume_url(key, url, at).await {
        web_sys::console::warn_1(&JsValue::from_str(&format!(
            "tidemark: the resume URL of stream {key} cannot be stored ({error}); \
             the stream goes on, but a reload would send its POST again"
        )));
    }
}

/// Forgets the stream `streamKey`: its cursor and, for a POST stream, its
/// resume URL, so that the key starts afresh (a POST stream POSTs again).
/// Rejects while a `ResumableEventSource` or tracker of the key is open in
/// this page.
///
/// `options`: `{ store?: "indexeddb" | "memory", database?: string }`.
#[wasm_bindgen(js_name = forgetStream)]
pub async fn forget_stream(stream_key: String, options: JsValue) -> Result<(), JsError> {
    let spec = StoreSpec::from_options(&options)?;
    let runtime = runtime(spec).await?;
    let key = stream_key_of(&stream_key);
    runtime.registry.remove(&key).await.map_err(|e| match e {
        RegistryError::StillOpen(_) => JsError::new(&format!(
            "streamKey {stream_key:?} is open in this page: close it first"
        )),
        e => JsError::new(&e.to_string()),
    })?;
    runtime
        .registry
        .store()
        .delete_resume_url(&key)
        .await
        .map_err(|e| JsError::new(&e.to_string()))
}

/// The POST side of `stats()`: `method`, `resumable` (`null` until the
/// answer to the POST says) and `resumeUrl`.
#[derive(Default)]
pub(crate) struct PostState {
    post: bool,
    resumable: Option<bool>,
    resume_url: Option<String>,
}

impl PostState {
    pub(crate) fn new(post: bool) -> Self {
        PostState {
            post,
            ..PostState::default()
        }
    }

    pub(crate) fn sync<C: Connector, K: Clock>(&mut self, stream: &ResumableStream<C, K>) {
        self.resumable = stream.resumable();
        if self.resume_url.as_deref() != stream.resume_url() {
            self.resume_url = stream.resume_url().map(str::to_owned);
        }
    }

    pub(crate) fn stats(&self, fields: js::Fields) -> js::Fields {
        fields
            .set("method", if self.post { "POST" } else { "GET" })
            .set(
                "resumable",
                self.resumable.map_or(JsValue::NULL, JsValue::from_bool),
            )
            .set("resumeUrl", js::opt_str(self.resume_url.as_ref()))
    }
}
