//! Headless Chromium for the report tests: the DOM it parsed and a screenshot of a page, and
//! colour counts in that screenshot.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's Chromium, where installed (`.ci/run` installs it).
pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Chromium, or `None` after printing why the test skips; on CI (`CI` set) a missing browser
/// fails the test instead, since `.ci/run` installs it.
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let c = chromium();
    if c.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: /usr/bin/chromium is missing on CI (.ci/run installs the chromium package)"
        );
        eprintln!("SKIP {test}: no /usr/bin/chromium (apt-get install chromium)");
    }
    c
}

fn run(chromium: &Path, profile: &Path, args: &[String]) -> std::process::Output {
    Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}

/// The DOM of `page` as Chromium serialized it after loading.
pub fn dump_dom(chromium: &Path, page: &Path, work: &Path) -> String {
    let out = run(
        chromium,
        &work.join("profile-dom"),
        &["--dump-dom".into(), format!("file://{}", page.display())],
    );
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `width`×`height` screenshot of `page`, decoded to RGB(A) rows.
pub struct Screenshot {
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel (3 or 4).
    pub channels: usize,
    pub pixels: Vec<u8>,
    pub path: PathBuf,
}

pub fn screenshot(
    chromium: &Path,
    page: &Path,
    work: &Path,
    width: u32,
    height: u32,
) -> Screenshot {
    let png = work.join("screenshot.png");
    let _ = std::fs::remove_file(&png);
    let out = run(
        chromium,
        &work.join("profile-shot"),
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},{height}"),
            format!("file://{}", page.display()),
        ],
    );
    assert!(
        png.is_file(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::fs::File::open(&png).expect("open screenshot"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    buf.truncate(info.buffer_size());
    Screenshot {
        width: info.width,
        height: info.height,
        channels,
        pixels: buf,
        path: png,
    }
}

impl Screenshot {
    /// Pixels within `tolerance` (per channel) of `rgb`.
    pub fn count(&self, rgb: (u8, u8, u8), tolerance: u8) -> usize {
        self.pixels
            .chunks_exact(self.channels)
            .filter(|p| {
                p[0].abs_diff(rgb.0) <= tolerance
                    && p[1].abs_diff(rgb.1) <= tolerance
                    && p[2].abs_diff(rgb.2) <= tolerance
            })
            .count()
    }
}

/// The elements of `figure id="chart-ID"` in a DOM: the figure's text, `None` if absent.
pub fn figure<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let start = dom.find(&format!("id=\"chart-{id}\""))?;
    let end = dom[start..].find("</figure>")? + start;
    Some(&dom[start..end])
}

/// The most points of one `<polyline>` of `colour` (`#RRGGBB`, any case) in a chart.
pub fn polyline_points(fig: &str, colour: &str) -> usize {
    let colour = colour.to_ascii_lowercase();
    fig.split("<polyline")
        .skip(1)
        .map(|p| &p[..p.find('>').unwrap_or(p.len())])
        .filter(|p| p.to_ascii_lowercase().contains(&colour))
        .filter_map(|p| p.split("points=\"").nth(1))
        .map(|p| p.split('"').next().unwrap_or("").split_whitespace().count())
        .max()
        .unwrap_or(0)
}
