//! Small conversions between JavaScript values and Rust, shared by the
//! exported classes.

use js_sys::{Object, Reflect};
use wasm_bindgen::{JsCast, JsError, JsValue};

/// `obj[key]`, or `None` when it is missing, `undefined` or `null`.
pub(crate) fn get(obj: &JsValue, key: &str) -> Option<JsValue> {
    if !obj.is_object() {
        return None;
    }
    Reflect::get(obj, &JsValue::from_str(key))
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_null())
}

/// Whether `obj[key]` is `null` (not missing, not `undefined`).
pub(crate) fn is_null(obj: &JsValue, key: &str) -> bool {
    obj.is_object() && Reflect::get(obj, &JsValue::from_str(key)).is_ok_and(|v| v.is_null())
}

/// The `message` of a thrown error, or its text.
pub(crate) fn message(error: &JsValue) -> String {
    Reflect::get(error, &JsValue::from_str("message"))
        .ok()
        .and_then(|m| m.as_string())
        .or_else(|| error.as_string())
        .unwrap_or_else(|| format!("{error:?}"))
}

/// `obj[key]` as a string; an error names the option when it is not one.
pub(crate) fn get_string(obj: &JsValue, key: &str) -> Result<Option<String>, JsError> {
    get(obj, key)
        .map(|v| {
            v.as_string()
                .ok_or_else(|| JsError::new(&format!("option `{key}` must be a string")))
        })
        .transpose()
}

/// `obj[key]` as a non-negative number of milliseconds or a count.
pub(crate) fn get_u64(obj: &JsValue, key: &str) -> Result<Option<u64>, JsError> {
    get(obj, key)
        .map(|v| match v.as_f64() {
            Some(n) if n >= 0.0 && n.is_finite() => Ok(n as u64),
            _ => Err(JsError::new(&format!(
                "option `{key}` must be a non-negative number"
            ))),
        })
        .transpose()
}

/// `obj[key]` as a boolean.
pub(crate) fn get_bool(obj: &JsValue, key: &str) -> Result<Option<bool>, JsError> {
    get(obj, key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| JsError::new(&format!("option `{key}` must be a boolean")))
        })
        .transpose()
}

/// Header pairs from a plain object, a `Headers`, or an array of pairs.
pub(crate) fn headers(value: &JsValue) -> Result<Vec<(String, String)>, JsError> {
    let invalid = || JsError::new("option `headers` must map header names to strings");
    let pair = |entry: JsValue| -> Result<(String, String), JsError> {
        let entry: js_sys::Array = entry.dyn_into().map_err(|_| invalid())?;
        match (entry.get(0).as_string(), entry.get(1).as_string()) {
            (Some(name), Some(value)) => Ok((name, value)),
            _ => Err(invalid()),
        }
    };
    if let Ok(Some(iter)) = js_sys::try_iter(value) {
        return iter
            .map(|entry| pair(entry.map_err(|_| invalid())?))
            .collect();
    }
    let object: &Object = value.dyn_ref().ok_or_else(invalid)?;
    Object::entries(object).iter().map(pair).collect()
}

/// A plain object built field by field.
pub(crate) struct Fields(Object);

impl Fields {
    pub(crate) fn new() -> Self {
        Fields(Object::new())
    }

    pub(crate) fn set(self, key: &str, value: impl Into<JsValue>) -> Self {
        // Setting a data property on a fresh plain object cannot fail.
        let _ = Reflect::set(&self.0, &JsValue::from_str(key), &value.into());
        self
    }

    /// Copies every field of `other` in.
    pub(crate) fn extend(self, other: &Object) -> Self {
        let _ = Object::assign(&self.0, other);
        self
    }

    pub(crate) fn build(self) -> Object {
        self.0
    }
}

/// An optional string, `null` when absent.
pub(crate) fn opt_str(s: Option<impl AsRef<str>>) -> JsValue {
    s.map_or(JsValue::NULL, |s| JsValue::from_str(s.as_ref()))
}
