//! `spotlight lens --html` checked in a real browser: headless Chromium driven by chromedriver
//! over the W3C WebDriver protocol (plain HTTP on 127.0.0.1, spoken with std::net and
//! serde_json: no new dependency, and the pointer actions make a real hover).
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! other paths through SPOTLIGHT_CHROMIUM / SPOTLIGHT_CHROMEDRIVER). Without them the tests say
//! SKIPPED loudly; with CI=true they fail.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use serde_json::{Value, json};
use spotlight::reference::random::Rng;
use spotlight::reference::{self, Inputs, Problem, TensorRef};

const BIN: &str = env!("CARGO_BIN_EXE_spotlight");

fn in_ci() -> bool {
    spotlight::testing::in_ci()
}

fn have_gpu() -> bool {
    spotlight::testing::engine_or_skip("this GPU test").is_some()
}

fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

/// The browser and its driver, or None (SKIPPED; a failure with CI=true).
fn tools() -> Option<(PathBuf, PathBuf)> {
    let chromium = find(
        "SPOTLIGHT_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find("SPOTLIGHT_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let msg = format!(
                "browser test needs chromium and chromedriver (found {c:?}, {d:?}): \
                 apt-get install chromium chromium-driver"
            );
            if in_ci() {
                panic!("CI=true: {msg}");
            }
            eprintln!("\n*** SKIPPED: {msg} ***\n");
            None
        }
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spotlight-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes q, k, v (f32, bshd) and an optional u8 mask, with `tokens` metadata when given.
fn write_problem(
    path: &Path,
    p: &Problem,
    qkv: &[Vec<f32>; 3],
    mask: Option<&[u8]>,
    tokens: Option<&[&str]>,
) {
    let shapes = [
        vec![p.batch, p.q_len, p.q_heads, p.head_dim],
        vec![p.batch, p.kv_len, p.kv_heads, p.head_dim],
        vec![p.batch, p.kv_len, p.kv_heads, p.v_head_dim],
    ];
    let bytes: Vec<Vec<u8>> = qkv
        .iter()
        .map(|v| bytemuck::cast_slice(v).to_vec())
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = ["q", "k", "v"]
        .iter()
        .zip(&bytes)
        .zip(&shapes)
        .map(|((n, b), s)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    if let Some(m) = mask {
        views.push((
            "mask".into(),
            safetensors::tensor::TensorView::new(Dtype::U8, vec![p.q_len, p.kv_len], m).unwrap(),
        ));
    }
    let meta = tokens.map(|t| HashMap::from([("tokens".to_string(), json!(t).to_string())]));
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

fn lens_html(input: &Path, html: &Path) {
    let out = Command::new(BIN)
        .args(["lens", input.to_str().unwrap(), "--html"])
        .arg(html)
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or("vulkan".into()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spotlight lens --html failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- a minimal WebDriver client ----

struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

fn http(port: u16, method: &str, path: &str, body: &Value) -> Result<Value, String> {
    let body = if method == "GET" {
        String::new()
    } else {
        body.to_string()
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // Read the headers, then Content-Length bytes (the driver may keep the connection open).
    let mut resp = Vec::new();
    let mut buf = [0u8; 65536];
    let (head, body) = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(usize::MAX);
            if body.len() >= len || (n == 0 && len == usize::MAX) {
                break (head.to_string(), body.to_string());
            }
        }
        if n == 0 {
            return Err(format!("connection closed: {text:.300}"));
        }
    };
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {head} / {body:.200}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {head}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

impl Browser {
    fn start(chromium: &Path, driver: &Path, name: &str) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let t = Instant::now();
        while http(port, "GET", "/status", &Value::Null).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tmpdir(&format!("profile-{name}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1200", format!("--user-data-dir={}", profile.display())]},
            "goog:loggingPrefs": {"browser": "ALL"}}}});
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
        };
        let v = http(port, "POST", "/session", &caps).expect("a browser session");
        b.session = v["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn cmd(&self, method: &str, what: &str, body: Value) -> Result<Value, String> {
        http(
            self.port,
            method,
            &format!("/session/{}/{what}", self.session),
            &body,
        )
    }

    fn open(&self, path: &Path, hash: &str) {
        let url = format!("file://{}{hash}", path.canonicalize().unwrap().display());
        self.cmd("POST", "url", json!({ "url": url })).unwrap();
    }

    fn exec(&self, script: &str, args: Value) -> Result<Value, String> {
        self.cmd(
            "POST",
            "execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// Console messages at level SEVERE (errors) since the last call.
    fn console_errors(&self) -> Vec<String> {
        let logs = self
            .cmd("POST", "se/log", json!({"type": "browser"}))
            .expect("chromedriver's browser log");
        logs.as_array()
            .unwrap()
            .iter()
            .filter(|l| l["level"] == "SEVERE")
            .map(|l| l["message"].to_string())
            .collect()
    }

    /// Moves the mouse to `(x, y)` CSS pixels from the top-left of the element `css`.
    fn hover(&self, css: &str, x: f64, y: f64) -> Result<(), String> {
        let at = self.exec(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect(); return [r.left, r.top];",
            json!([css]),
        )?;
        let (vx, vy) = (at[0].as_f64().unwrap() + x, at[1].as_f64().unwrap() + y);
        self.cmd(
            "POST",
            "actions",
            json!({"actions": [{"type": "pointer", "id": "mouse",
            "parameters": {"pointerType": "mouse"}, "actions": [
                {"type": "pointerMove", "duration": 0, "origin": "viewport",
                 "x": vx.round() as i64, "y": vy.round() as i64}]}]}),
        )?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                &Value::Null,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What a report must show, checked through the DOM. Returns every problem found.
struct Expect<'a> {
    /// The head to open (`#head=`), the labels of both axes in order.
    head: usize,
    labels: &'a [String],
    /// For a diagonal map: the brightest cell of each row is on the diagonal.
    diagonal: bool,
    /// Cells (query, key, reference weight) to hover.
    hover: &'a [(usize, usize, f64)],
}

fn check_report(b: &Browser, page: &Path, e: &Expect<'_>) -> Result<(), String> {
    let mut errs = Vec::new();
    b.console_errors(); // drop what an earlier page left
    b.open(page, &format!("#head={}", e.head));
    let errors = b.console_errors();
    if !errors.is_empty() {
        errs.push(format!("console errors: {errors:?}"));
    }
    let labels = b.exec(
        "return [[...document.querySelectorAll('#xlabels .klabel')].map(e => e.textContent),
                 [...document.querySelectorAll('#ylabels .qlabel')].map(e => e.textContent),
                 document.scripts.length]",
        json!([]),
    )?;
    for (axis, got) in ["key", "query"].iter().zip(labels.as_array().unwrap()) {
        let got: Vec<String> = serde_json::from_value(got.clone()).unwrap();
        if got != e.labels {
            errs.push(format!("{axis} labels {got:?}, want {:?}", e.labels));
        }
    }
    if labels[2] != 2 {
        errs.push(format!(
            "{} script elements, want 2 (data and code)",
            labels[2]
        ));
    }
    if e.diagonal {
        let best = b.exec(
            "const c = document.getElementById('map'), n = arguments[0], px = c.width / n;
             const ctx = c.getContext('2d'), out = [];
             for (let i = 0; i < n; i++) { let hi = -1, at = -1;
               for (let j = 0; j < n; j++) { const d = ctx.getImageData(Math.floor((j + .5) * px), Math.floor((i + .5) * px), 1, 1).data;
                 const s = d[0] + d[1] + d[2]; if (s > hi) { hi = s; at = j; } }
               out.push(at); }
             return out;",
            json!([e.labels.len()]),
        )?;
        let want: Vec<usize> = (0..e.labels.len()).collect();
        if best != json!(want) {
            errs.push(format!(
                "brightest cell per row at {best}, want the diagonal"
            ));
        }
    }
    for &(i, j, w) in e.hover {
        b.exec(
            "document.getElementById('map').scrollIntoView({block: 'center', inline: 'center'})",
            json!([]),
        )?;
        let px = b.exec(
            "const c = document.getElementById('map'); return c.getBoundingClientRect().width / arguments[0];",
            json!([e.labels.len()]),
        )?;
        let px = px.as_f64().unwrap_or(0.0);
        b.hover("#map", (j as f64 + 0.5) * px, (i as f64 + 0.5) * px)?;
        let tip = b.exec(
            "const t = document.getElementById('tip'); return [t.hidden, t.textContent];",
            json!([]),
        )?;
        let text = tip[1].as_str().unwrap_or("");
        let shown = text
            .rsplit("weight ")
            .next()
            .and_then(|x| x.trim().parse::<f64>().ok());
        // One byte on a square-root scale (sqrt(w)/254), four decimals shown, GPU rounding.
        let tol = w.sqrt() / 254.0 + 4e-6 + 5e-5 + 1e-5;
        let want_text = format!(
            "query \u{201c}{}\u{201d} \u{2192} key \u{201c}{}\u{201d}",
            e.labels[i], e.labels[j]
        );
        match shown {
            Some(x) if tip[0] == false && (x - w).abs() <= tol && text.starts_with(&want_text) => {}
            _ => errs.push(format!(
                "hover ({i}, {j}): tip {tip}, want '{want_text}' and weight {w:.4} ± {tol:.4}"
            )),
        }
    }
    let late = b.console_errors();
    if !late.is_empty() {
        errs.push(format!("console errors after interaction: {late:?}"));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

#[test]
fn a_diagonal_mask_report_lights_the_diagonal_and_a_broken_report_fails() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("diag");
    let n = 24;
    let p = Problem::new(1, n, n, 2, 2, 16);
    let mut rng = Rng::new(11);
    let qkv = [rng.vec(n * 32), rng.vec(n * 32), rng.vec(n * 32)];
    let mask: Vec<u8> = (0..n * n).map(|x| (x / n == x % n) as u8).collect();
    let input = dir.join("diag.safetensors");
    write_problem(&input, &p, &qkv, Some(&mask), None);
    let page = dir.join("diag.html");
    lens_html(&input, &page);
    let labels: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let b = Browser::start(&chromium, &driver, "diag");
    let e = Expect {
        head: 1,
        labels: &labels,
        diagonal: true,
        hover: &[(3, 3, 1.0), (3, 4, 0.0)],
    };
    check_report(&b, &page, &e).unwrap();

    // The same checks must fail on a broken page: a script error, and a map drawn transposed
    // and shifted (what an indexing bug would do).
    let good = std::fs::read_to_string(&page).unwrap();
    let broken = dir.join("broken.html");
    std::fs::write(
        &broken,
        good.replacen("\"use strict\";", "\"use strict\"; )", 1),
    )
    .unwrap();
    let err = check_report(&b, &broken, &e).expect_err("a page with a script error passed");
    assert!(err.contains("console errors"), "{err}");
    eprintln!("broken report (script error) fails as it should:\n{err}");
    let shifted = dir.join("shifted.html");
    std::fs::write(
        &shifted,
        good.replacen(
            "out[i] = q === 255",
            "out[(i + 1) % s.length] = q === 255",
            1,
        ),
    )
    .unwrap();
    let err = check_report(&b, &shifted, &e).expect_err("a shifted map passed");
    assert!(err.contains("diagonal") && err.contains("hover"), "{err}");
    eprintln!("broken report (shifted map) fails as it should:\n{err}");
}

#[test]
fn hostile_tokens_are_text_and_hover_shows_the_reference_weight() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("hostile");
    let tokens = [
        "[CLS]",
        "<script>alert(1)</script>",
        "</script><b>",
        "\"double\"",
        "'single'",
        "&amp;",
        "na\u{ef}ve",
        "\u{6771}\u{4eac}",
        "\u{1f642}",
        "line\u{2028}sep",
        "<!--",
        "[SEP]",
    ];
    let n = tokens.len();
    let p = Problem::new(1, n, n, 2, 2, 16);
    let mut rng = Rng::new(21);
    let qkv = [rng.vec(n * 32), rng.vec(n * 32), rng.vec(n * 32)];
    let input = dir.join("hostile.safetensors");
    write_problem(&input, &p, &qkv, None, Some(&tokens));
    let page = dir.join("hostile.html");
    lens_html(&input, &page);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("<script>alert"),
        "a token left raw in the page"
    );
    let r = reference::attention(
        &p,
        &Inputs::new(
            TensorRef::F32(&qkv[0]),
            TensorRef::F32(&qkv[1]),
            TensorRef::F32(&qkv[2]),
        ),
    )
    .unwrap();
    // probs [B, Hq, Lq, Lk]; head 1.
    let w = |i: usize, j: usize| r.probs[(n + i) * n + j] as f64;
    let hover: Vec<(usize, usize, f64)> = [(1, 0), (5, 7), (11, 11), (8, 2)]
        .iter()
        .map(|&(i, j)| (i, j, w(i, j)))
        .collect();
    let labels: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let b = Browser::start(&chromium, &driver, "hostile");
    check_report(
        &b,
        &page,
        &Expect {
            head: 1,
            labels: &labels,
            diagonal: false,
            hover: &hover,
        },
    )
    .unwrap();
    // The generated readings quote tokens as text too.
    let notable = b
        .exec(
            "return [...document.querySelectorAll('#notable-list li')].map(e => e.textContent)",
            json!([]),
        )
        .unwrap();
    assert!(
        notable.as_array().unwrap().iter().any(|t| t
            .as_str()
            .unwrap()
            .contains("the first token (\u{201c}[CLS]\u{201d}): layer")
            || t.as_str()
                .unwrap()
                .contains("the first token (\u{201c}[CLS]\u{201d}): head")),
        "{notable}"
    );
}
