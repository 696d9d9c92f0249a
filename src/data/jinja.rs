//! A Jinja environment that renders Hugging Face chat templates as transformers'
//! `apply_chat_template` does (transformers 5 `utils/chat_template_utils.py`): `trim_blocks` and
//! `lstrip_blocks` on, the single trailing newline of the source dropped, loop controls, Python
//! string/dict methods (`.strip()`, `.startswith()`, `.items()`), and the globals transformers adds:
//! `raise_exception`, `strftime_now` and a `tojson` that writes what Python's `json.dumps` writes
//! (no HTML escaping, non-ASCII kept). `{% generation %}` blocks (transformers' assistant-mask
//! extension) render their body unchanged.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error as JinjaError, ErrorKind};

/// Name of the one template an environment holds.
pub const TEMPLATE_NAME: &str = "chat_template";

/// An environment holding `source` as [`TEMPLATE_NAME`]; a syntax error is returned as text.
pub fn environment(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| e.to_string())?,
    );
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, format!("the chat template raised an exception: {msg}")))
    });
    env.add_function("strftime_now", |format: String| -> Result<String, JinjaError> {
        strftime_now(&format).ok_or_else(|| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now({format:?}) failed")))
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source)).map_err(|e| describe(&e))?;
    Ok(env)
}

/// An error with its cause chain (minijinja puts the template line in the detail).
pub fn describe(e: &JinjaError) -> String {
    let mut msg = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = cur {
        msg.push_str(&format!(": {s}"));
        cur = s.source();
    }
    msg
}

/// `{% generation %}` / `{% endgeneration %}` become `{% if true %}` / `{% endif %}` with the same
/// whitespace-control markers, so the text around them is trimmed exactly as Jinja trims it.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open} if true {close}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open} endif {close}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The local time formatted by the C library, as Python's `datetime.now().strftime` does.
fn strftime_now(format: &str) -> Option<String> {
    let fmt = std::ffi::CString::new(format).ok()?;
    // SAFETY: `time` and `localtime_r` only write to the locals passed; `strftime` writes at most
    // `buf.len()` bytes and returns how many it wrote (0 on overflow, handled below).
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return None;
        }
        let mut buf = vec![0u8; 256 + 8 * format.len()];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
        if n == 0 && !format.is_empty() {
            return None;
        }
        buf.truncate(n);
        String::from_utf8(buf).ok()
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    if ensure_ascii == Some(true) {
        return Err(JinjaError::new(ErrorKind::InvalidOperation, "tojson(ensure_ascii=true) is not supported"));
    }
    let mut out = String::new();
    write_json(value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(out)
}

fn write_json(v: &Value, indent: Option<usize>, sort: bool, level: usize, out: &mut String) -> Result<(), JinjaError> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) if v.is_integer() => out.push_str(&i.to_string()),
            _ => out.push_str(&python_float(f64::try_from(v.clone())?)),
        },
        ValueKind::String => write_json_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_items(('[', ']'), &items, indent, level, out, |item, out| write_json(item, indent, sort, level + 1, out))?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            write_items(('{', '}'), &keys, indent, level, out, |k, out| {
                write_json_str(&k.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, sort, level + 1, out)
            })?;
        }
        other => return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson cannot write a value of kind {other}"))),
    }
    Ok(())
}

/// A bracketed JSON list of `items` laid out as `json.dumps` lays them out: `", "` between items
/// without `indent`, else one item per line indented by `indent` spaces per level.
fn write_items(
    (open, close): (char, char),
    items: &[Value],
    indent: Option<usize>,
    level: usize,
    out: &mut String,
    mut write: impl FnMut(&Value, &mut String) -> Result<(), JinjaError>,
) -> Result<(), JinjaError> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    out.push(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, level + 1);
        write(item, out)?;
    }
    if !items.is_empty() {
        newline(out, level);
    }
    out.push(close);
    Ok(())
}

/// Python's `repr(float)` for the values templates carry (shortest round-trip, `.0` on integers).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// A JSON string as `json.dumps(..., ensure_ascii=False)` writes it.
fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn render(src: &str, ctx: Value) -> String {
        environment(src).unwrap().get_template(TEMPLATE_NAME).unwrap().render(ctx).unwrap()
    }

    #[test]
    fn whitespace_control_and_python_methods_follow_jinja() {
        // Expected output: Python jinja2 3.1.6 with transformers' settings on the same source.
        let src = "{% for m in messages %}\n  {{ m.content.strip() }}|\n  {% if true %}x{% endif %}\n{% endfor %}\n";
        let msgs = vec![context! { content => "  a " }, context! { content => "b\n" }];
        assert_eq!(render(src, context! { messages => msgs }), "  a|\nx  b|\nx");
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(render("x {%- generation %} y {%- endgeneration %} z", context! {}), "x y z");
        assert_eq!(without_generation_tags("{% generation %}a{%+ endgeneration -%}"), "{% if true %}a{%+ endif -%}");
    }

    #[test]
    fn tojson_writes_python_json() {
        let v = context! { name => "é\"\n", n => 1, f => 0.5, l => vec![1, 2], e => Vec::<i32>::new() };
        assert_eq!(render("{{ v | tojson }}", context! { v => v.clone() }), r#"{"name": "é\"\n", "n": 1, "f": 0.5, "l": [1, 2], "e": []}"#);
        assert_eq!(render("{{ v | tojson(indent=2) }}", context! { v => vec![1] }), "[\n  1\n]");
        assert!(environment("{{ raise_exception('bad role') }}")
            .unwrap()
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(context! {})
            .is_err());
    }

    #[test]
    fn strftime_now_formats_today() {
        let s = strftime_now("%Y").unwrap();
        assert_eq!(s.len(), 4);
        assert!(s.parse::<u32>().unwrap() >= 2024);
    }
}
