//! Text rewrites the kernels are written for: loops unrolled and blocks expanded per variant,
//! where WGSL has no construct that says the same (constant register indices, arrays of
//! cooperative matrices).

/// repeated N times, each copy a block that starts with `let X = <i>u;`. The WGSL stays valid
/// (and means the same) either way; unrolled, every index by X is a constant. Nested marked loops
/// are unrolled too. Bodies must not `break` or `continue`.
pub fn unroll_marked(src: &str, bounds: &[(&str, u32)]) -> String {
    let mut lines: Vec<String> = src.lines().map(str::to_string).collect();
    while let Some(at) = lines
        .iter()
        .position(|l| l.trim_end().ends_with("{ // unroll"))
    {
        let header = lines[at].trim().to_string();
        let indent = &lines[at][..lines[at].len() - lines[at].trim_start().len()];
        let indent = indent.to_string();
        let inner = header
            .strip_prefix("for (var ")
            .and_then(|h| h.strip_suffix(") { // unroll"))
            .unwrap_or_else(|| panic!("not an unrollable loop header: {header}"));
        let parts: Vec<&str> = inner.split(';').map(str::trim).collect();
        let name = parts[0]
            .strip_suffix(" = 0u")
            .unwrap_or_else(|| panic!("loop must start at 0u: {header}"));
        let bound = parts
            .get(1)
            .and_then(|c| c.strip_prefix(&format!("{name} < ")))
            .unwrap_or_else(|| panic!("loop must test {name} < N: {header}"));
        assert_eq!(parts.get(2).copied(), Some(format!("{name}++").as_str()));
        let n = bounds
            .iter()
            .find(|b| b.0 == bound)
            .unwrap_or_else(|| panic!("no bound for {bound}: {header}"))
            .1;
        // The body: up to the brace that closes the header's.
        let mut depth = 1i32;
        let mut end = at + 1;
        loop {
            let code = lines[end].split("//").next().unwrap_or("");
            depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
            if depth == 0 {
                break;
            }
            end += 1;
        }
        assert_eq!(
            lines[end].trim(),
            "}",
            "loop body must close on its own line"
        );
        let body = &lines[at + 1..end];
        assert!(
            !body
                .iter()
                .any(|l| l.contains("break;") || l.contains("continue;")),
            "an unrolled loop cannot break or continue: {header}"
        );
        let mut out = Vec::with_capacity(body.len() * n as usize + 2 * n as usize);
        for i in 0..n {
            out.push(format!("{indent}{{ const {name} = {i}u;"));
            out.extend(body.iter().cloned());
            out.push(format!("{indent}}}"));
        }
        lines.splice(at..=end, out);
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Expands, in the text, every block between a line `// each X < N {` (N a name in `bounds`) and
/// the line `// } each X`: its lines are repeated N times, with `{X}` replaced by 0, 1, ...
/// Unlike [`unroll_marked`], the copies share the enclosing scope, so they can declare numbered
/// variables (`var acc_{X}`) that later blocks use: how a kernel holds a number of values the
/// language cannot put in an array (cooperative matrices). Blocks nest (with different names;
/// the outer is expanded first, so inner lines may use both).
pub fn expand_marked(src: &str, bounds: &[(&str, u32)]) -> String {
    let mut lines: Vec<String> = src.lines().map(str::to_string).collect();
    while let Some(at) = lines.iter().position(|l| {
        let t = l.trim();
        t.starts_with("// each ") && t.ends_with(" {")
    }) {
        let header = lines[at].trim().to_string();
        let spec = &header["// each ".len()..header.len() - " {".len()];
        let (name, bound) = spec
            .split_once(" < ")
            .unwrap_or_else(|| panic!("not an expandable block: {header}"));
        let n = bounds
            .iter()
            .find(|b| b.0 == bound)
            .unwrap_or_else(|| panic!("no bound for {bound}: {header}"))
            .1;
        let end_marker = format!("// }} each {name}");
        let end = at
            + lines[at..]
                .iter()
                .position(|l| l.trim() == end_marker)
                .unwrap_or_else(|| panic!("{header}: no closing `{end_marker}`"));
        let key = format!("{{{name}}}");
        let mut copies = Vec::with_capacity((end - at) * n as usize);
        for i in 0..n {
            let i = i.to_string();
            copies.extend(lines[at + 1..end].iter().map(|l| l.replace(&key, &i)));
        }
        lines.splice(at..=end, copies);
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}
