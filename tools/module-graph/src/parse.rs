//! What one source file names: the paths of its `use` statements (brace lists expanded) and
//! its inline `crate::`/`super::`/`self::` paths. A line reader, not a Rust parser: it is
//! enough for code that rustfmt formats, and the tests that use it check known edges first.

/// `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let (head, inner) = (&tree[..open], &tree[open + 1..tree.len() - 1]);
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let parts = parts.into_iter().filter(|p| !p.is_empty());
    parts.flat_map(|p| expand(&format!("{head}{p}"))).collect()
}

/// A path one file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub path: String,
    /// Inside an inline `mod`, where `super` is the file's own module.
    pub inline: bool,
    /// Named by a `pub use`: re-exported, part of the module's public face.
    pub reexport: bool,
}

/// The paths one file names.
pub fn paths(src: &str) -> Vec<Named> {
    let (mut out, mut depth, mut inline_at) = (Vec::new(), 0i32, None::<i32>);
    let mut stmt: Option<(String, bool)> = None;
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or_default().trim();
        let inline = inline_at.is_some();
        if inline_at.is_none() && code.starts_with("mod ") && code.ends_with('{') {
            inline_at = Some(depth);
        }
        depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
        if inline_at.is_some_and(|d| depth <= d) {
            inline_at = None;
        }
        let use_at = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
            .into_iter()
            .find(|p| code.starts_with(p));
        if let Some((s, _)) = stmt.as_mut() {
            s.push_str(code);
        } else if let Some(p) = use_at {
            stmt = Some((code[p.len()..].to_string(), p == "pub use "));
        } else {
            let found = inline_paths(code).map(|path| Named {
                path,
                inline,
                reexport: false,
            });
            out.extend(found);
        }
        if let Some((s, reexport)) = stmt.take_if(|(s, _)| s.ends_with(';')) {
            let tree = s
                .trim_end_matches(';')
                .split(" as ")
                .next()
                .unwrap_or_default();
            let found = expand(tree).into_iter().map(|path| Named {
                path,
                inline,
                reexport,
            });
            out.extend(found);
        }
    }
    out
}

/// `crate::a::b`, `super::c` and `self::d` paths in a line of code.
fn inline_paths(code: &str) -> impl Iterator<Item = String> + '_ {
    ["crate::", "super::", "self::"]
        .into_iter()
        .flat_map(move |root| {
            code.match_indices(root)
                .filter(move |(i, _)| {
                    !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                })
                .map(move |(i, _)| {
                    code[i..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect::<String>()
                })
        })
}
