//! How `watch`, `submit --wait` and `demo` show a campaign's events: on a terminal, a progress
//! bar per running task (indicatif: position, rate, loss, ETA) with the other events printed
//! above the bars; otherwise, or with `--plain`, one log line per event.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use distillery_proto::v1 as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where a watch sends what it sees.
pub trait ProgressView: Send {
    /// One event of the campaign, in order.
    fn event(&mut self, e: &pb::Event);
    /// A line that is not an event (e.g. a search's candidates under its `search_decided`).
    fn note(&mut self, line: &str);
    /// The watch is over (bars are cleared, output flushed).
    fn finish(&mut self) {}
}

/// Bars on a terminal unless `plain`; log lines on stdout otherwise.
pub fn for_stdout(plain: bool) -> Box<dyn ProgressView> {
    if !plain && std::io::stdout().is_terminal() {
        Box::new(Bars::new(ProgressDrawTarget::stdout()))
    } else {
        Box::new(Plain(Box::new(std::io::stdout())))
    }
}

/// One line per event on a writer.
pub struct Plain(pub Box<dyn Write + Send>);

impl ProgressView for Plain {
    fn event(&mut self, e: &pb::Event) {
        let _ = writeln!(self.0, "{}", event_line(e));
        let _ = self.0.flush();
    }
    fn note(&mut self, line: &str) {
        let _ = writeln!(self.0, "{line}");
        let _ = self.0.flush();
    }
}

/// A task's progress metrics without the `progress.` prefix the workers report them under.
pub fn progress_metrics(e: &pb::Event) -> BTreeMap<String, f64> {
    e.metrics
        .iter()
        .map(|(k, v)| (k.strip_prefix("progress.").unwrap_or(k).to_string(), *v))
        .collect()
}

/// Where a task is: `(done, total, unit)` from the counters a task kind reports
/// (`distill.step/total_steps`, `score.sequences/total`, `score_depth.passes/total`,
/// `judge.done/total`, `generate.questions/total`, or any `X.done/X.total`).
pub fn position(m: &BTreeMap<String, f64>) -> Option<(f64, f64, &'static str)> {
    for (total_key, done_key, unit) in [
        ("distill.total_steps", "distill.step", "step"),
        ("score.total", "score.sequences", "sequences"),
        ("score_depth.total", "score_depth.passes", "passes"),
        ("judge.total", "judge.done", "judged"),
        ("generate.total", "generate.questions", "answered"),
    ] {
        if let (Some(d), Some(t)) = (m.get(done_key), m.get(total_key)) {
            return Some((*d, *t, unit));
        }
    }
    m.iter()
        .filter_map(|(k, t)| {
            let p = k.strip_suffix(".total")?;
            Some((*m.get(&format!("{p}.done"))?, *t, "items"))
        })
        .next()
}

/// What a progress bar says beside its position: loss, learning rate, throughput.
fn detail(m: &BTreeMap<String, f64>) -> String {
    let mut s = String::new();
    if let Some(l) = m.get("distill.loss") {
        s.push_str(&format!(" loss {l:.4}"));
    }
    if let Some(lr) = m.get("distill.lr") {
        s.push_str(&format!(" lr {lr:.2e}"));
    }
    if let Some(t) = m.get("distill.tokens") {
        s.push_str(&format!(" {:.0}k tok", t / 1e3));
    }
    if let Some(tps) = m.get("distill.tokens_per_s") {
        s.push_str(&format!(" {tps:.0} tok/s"));
    }
    if let Some(a) = m.get("judge.asked") {
        s.push_str(&format!(" ({a:.0} asked)"));
    }
    s
}

fn ascii_bar(done: f64, total: f64) -> String {
    let frac = if total > 0.0 {
        (done / total).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let n = (frac * 24.0).round() as usize;
    format!(
        "[{}{}] {:>5.1}%",
        "#".repeat(n),
        ".".repeat(24 - n),
        frac * 100.0
    )
}

fn clock(ms: u64) -> String {
    let s = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// The plain line of an event (what `watch` prints when it is not on a terminal).
pub fn event_line(e: &pb::Event) -> String {
    let m = progress_metrics(e);
    match (e.kind.as_str(), position(&m)) {
        ("task_progress", Some((done, total, unit))) => format!(
            "{} round {} {:<8} {} {} {unit} {done}/{total}{}",
            clock(e.time_ms),
            e.round,
            e.phase,
            e.task_id,
            ascii_bar(done, total),
            detail(&m)
        ),
        _ => format!("{} {}", clock(e.time_ms), e.message),
    }
}

/// A bar per running task on a terminal.
pub struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl Bars {
    pub fn new(target: ProgressDrawTarget) -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
        }
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template(
            "{prefix:.bold} [{bar:28.cyan/blue}] {pos}/{len} {msg} ({elapsed}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
    }

    fn println(&self, line: &str) {
        // Printed above the bars; with no bar drawn (hidden target), not at all: fall back.
        if self.multi.println(line).is_err() || self.multi.is_hidden() {
            println!("{line}");
        }
    }
}

impl ProgressView for Bars {
    fn event(&mut self, e: &pb::Event) {
        let m = progress_metrics(e);
        match e.kind.as_str() {
            "task_progress" => {
                if let Some((done, total, unit)) = position(&m) {
                    let bar = self.bars.entry(e.task_id.clone()).or_insert_with(|| {
                        let b = self.multi.add(ProgressBar::new(total.max(1.0) as u64));
                        b.set_style(Bars::style());
                        b.enable_steady_tick(Duration::from_millis(250));
                        b
                    });
                    bar.set_prefix(format!("round {} {} {}", e.round, e.phase, e.task_id));
                    bar.set_length(total.max(1.0) as u64);
                    bar.set_position(done.max(0.0) as u64);
                    bar.set_message(format!("{unit}{}", detail(&m)));
                } else {
                    self.println(&event_line(e));
                }
            }
            kind => {
                if matches!(
                    kind,
                    "task_succeeded" | "task_failed" | "task_retry" | "task_lost" | "task_revoked"
                ) {
                    if let Some(b) = self.bars.remove(&e.task_id) {
                        b.finish_and_clear();
                        self.multi.remove(&b);
                    }
                }
                self.println(&event_line(e));
            }
        }
    }

    fn note(&mut self, line: &str) {
        self.println(line);
    }

    fn finish(&mut self) {
        for (_, b) in self.bars.drain() {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(metrics: &[(&str, f64)]) -> pb::Event {
        pb::Event {
            kind: "task_progress".into(),
            task_id: "t00000007".into(),
            round: 1,
            phase: "distill".into(),
            time_ms: 3_723_000,
            metrics: metrics
                .iter()
                .map(|(k, v)| (format!("progress.{k}"), *v))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_task_kind_has_a_position() {
        let m = |p: &[(&str, f64)]| progress_metrics(&progress(p));
        assert_eq!(
            position(&m(&[("distill.step", 3.0), ("distill.total_steps", 10.0)])),
            Some((3.0, 10.0, "step"))
        );
        assert_eq!(
            position(&m(&[("score.sequences", 8.0), ("score.total", 32.0)])),
            Some((8.0, 32.0, "sequences"))
        );
        assert_eq!(
            position(&m(&[("judge.done", 1.0), ("judge.total", 4.0)])),
            Some((1.0, 4.0, "judged"))
        );
        assert_eq!(
            position(&m(&[("generate.questions", 3.0), ("generate.total", 8.0)])),
            Some((3.0, 8.0, "answered"))
        );
        assert_eq!(
            position(&m(&[("eval.done", 2.0), ("eval.total", 5.0)])),
            Some((2.0, 5.0, "items"))
        );
        assert_eq!(position(&m(&[("distill.loss", 2.0)])), None);
    }

    #[test]
    fn a_plain_line_shows_position_loss_and_rate() {
        let e = progress(&[
            ("distill.step", 6.0),
            ("distill.total_steps", 12.0),
            ("distill.loss", 1.23456),
            ("distill.tokens_per_s", 4321.0),
        ]);
        let l = event_line(&e);
        assert!(l.starts_with("01:02:03 round 1 distill"), "{l}");
        assert!(l.contains(" 50.0%") && l.contains("step 6/12"), "{l}");
        assert!(l.contains("loss 1.2346") && l.contains("4321 tok/s"), "{l}");
    }

    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            160
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            let mut t = self.0.lock().unwrap();
            t.push_str(s);
            t.push('\n');
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_a_terminal_a_bar_shows_task_position_loss_and_eta_and_events_print_above() {
        let screen = Screen::default();
        let mut b = Bars::new(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        b.event(&progress(&[
            ("distill.step", 3.0),
            ("distill.total_steps", 12.0),
            ("distill.loss", 0.75),
            ("distill.tokens_per_s", 999.0),
        ]));
        b.event(&pb::Event {
            kind: "task_leased".into(),
            message: "task t00000008 leased to w1".into(),
            time_ms: 3_723_000,
            ..Default::default()
        });
        b.finish();
        let text = screen.0.lock().unwrap().clone();
        assert!(text.contains("round 1 distill t00000007"), "{text}");
        assert!(text.contains("3/12 step loss 0.7500"), "{text}");
        assert!(text.contains("999 tok/s") && text.contains("ETA"), "{text}");
        assert!(
            text.contains("01:02:03 task t00000008 leased to w1"),
            "{text}"
        );
    }

    #[test]
    fn bars_follow_tasks_and_end_with_them() {
        let mut b = Bars::new(ProgressDrawTarget::hidden());
        b.event(&progress(&[
            ("distill.step", 1.0),
            ("distill.total_steps", 4.0),
        ]));
        b.event(&progress(&[
            ("distill.step", 3.0),
            ("distill.total_steps", 4.0),
        ]));
        assert_eq!(b.bars.len(), 1);
        assert_eq!(b.bars["t00000007"].position(), 3);
        assert_eq!(b.bars["t00000007"].length(), Some(4));
        b.event(&pb::Event {
            kind: "task_succeeded".into(),
            task_id: "t00000007".into(),
            ..Default::default()
        });
        assert!(b.bars.is_empty());
    }
}
