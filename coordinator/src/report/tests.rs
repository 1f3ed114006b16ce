//! The report from synthetic `status --json` objects: each section appears when its data
//! exists, including those whose data other parts of Distillery add (search candidates, MT-Bench
//! scores, a ranking), under the field names their issues document.

use serde_json::{json, Value};

use super::render;

fn task(id: &str, kind: &str, round: u32, steps: u32, outcome: &str) -> Value {
    let progress: Vec<Value> = (1..=steps)
        .map(|s| {
            json!({"time_ms": 1_000_000 + 100 * s as u64, "metrics": {
                "distill.step": s, "distill.total_steps": steps,
                "distill.loss": 3.0 / (1.0 + s as f64 / 10.0),
                "distill.kl": 2.0 / (1.0 + s as f64 / 10.0),
                "distill.lr": 1e-3 * (1.0 - s as f64 / steps as f64),
                "distill.tokens_per_s": 5000.0 + s as f64,
            }})
        })
        .collect();
    json!({
        "id": id, "kind": kind, "state": "succeeded", "round": round, "phase": kind,
        "world_size": 2, "attempts": 2, "lost": 1, "failed": 0, "revoked": 0,
        "checkpoint": null, "error": "lease expired",
        "progress": if kind == "distill" { json!(progress) } else { json!([]) },
        "attempt_log": [
            {"lease_id": 1, "workers": ["w1", "w2"], "hosts": ["a", "b"], "start_ms": 1_000_000,
             "end_ms": 1_001_000, "outcome": outcome},
            {"lease_id": 2, "workers": ["w2", "w1"], "hosts": ["b", "a"], "start_ms": 1_001_500,
             "end_ms": 1_004_000, "outcome": "succeeded"},
        ],
    })
}

fn round(i: u32, params: f64, ppl: f64) -> Value {
    json!({
        "index": i, "state": "succeeded", "phase": "done", "params": params as u64,
        "target": {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 0, "num_layers": 0, "params": 0},
        "artifacts": {"student": format!("sha256:{i:064}")},
        "metrics": {
            "perplexity": ppl, "teacher_perplexity": 9.0, "params": params,
            "shape": {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_layers": 4},
            "source": {"params": 900_000.0, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_layers": 4},
            "judge": {"wins": 3, "ties": 4, "losses": 5, "win_rate": 0.42, "ci_low": 0.2, "ci_high": 0.6,
                      "position_consistency": 0.7, "unparsed": 0, "winner_mean_chars": 80.0, "loser_mean_chars": 60.0},
            "distill": {"steps": 40, "tokens": 40000, "final_loss": 1.2, "world_size": 2, "tokens_per_s": 5000.0},
        },
        "extensions": 0,
        "gate": [{"time_ms": 1_005_000, "decision": "pass", "reason": "perplexity 12 is 1.3x the teacher's 9 (limit 3)", "metrics": {}}],
        "tasks": [task(&format!("t{i}a"), "score", i, 0, "lost"), task(&format!("t{i}b"), "distill", i, 40, "failed")],
    })
}

fn campaign(rounds: Vec<Value>) -> Value {
    json!({
        "id": "c000001", "name": "demo", "state": "succeeded", "error": null,
        "created_ms": 1_000_000, "updated_ms": 1_010_000,
        "tasks": {"pending": 0, "leased": 0, "succeeded": 4, "failed": 0, "cancelled": 0},
        "retries": 0, "rounds": rounds,
    })
}

fn figure<'a>(html: &'a str, id: &str) -> Option<&'a str> {
    let start = html.find(&format!("<figure class=\"chart\" id=\"chart-{id}\""))?;
    let end = html[start..].find("</figure>")? + start;
    Some(&html[start..end])
}

/// Whether a chart draws `s` as SVG text (plotters writes the text on its own line).
fn has_text(fig: &str, s: &str) -> bool {
    fig.contains(&format!("{s}\n</text>"))
}

fn polyline_points(fig: &str, colour: &str) -> usize {
    fig.lines()
        .filter(|l| l.contains("<polyline") && l.contains(colour))
        .filter_map(|l| l.split("points=\"").nth(1))
        .map(|p| p.split('"').next().unwrap_or("").split_whitespace().count())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_two_round_campaign_has_every_section_with_data() {
    let html = render(&campaign(vec![
        round(0, 600_000.0, 12.0),
        round(1, 400_000.0, 15.0),
    ]));
    for id in ["frontier", "rounds", "distill", "judge", "gate", "tasks"] {
        assert!(
            html.contains(&format!("<section id=\"{id}\"")),
            "section {id}"
        );
    }
    // The frontier joins teacher → round 0 → round 1: three points on the student colour.
    let f = figure(&html, "frontier").expect("frontier chart");
    assert_eq!(polyline_points(f, "#2CA02C"), 3, "{f}");
    assert!(
        has_text(f, "teacher") && has_text(f, "round 1"),
        "point labels"
    );
    // Loss and KL curves of each distillation, 40 points each.
    let l = figure(&html, "loss-t0b").expect("loss chart");
    assert_eq!(polyline_points(l, "#D62728"), 40);
    assert_eq!(polyline_points(l, "#1F77B4"), 40);
    assert!(figure(&html, "lr-t1b").is_some() && figure(&html, "tps-t1b").is_some());
    // The timeline: 2 tasks × 2 attempts × 2 ranks per round.
    let t = figure(&html, "timeline").expect("timeline");
    assert!(t.contains("data-points=\"16\""), "{}", &t[..200]);
    assert!(t.contains("a (w1)") && t.contains("b (w2)"), "worker lanes");
    // Failed attempts outlined in red.
    assert!(t.matches("stroke=\"#D62728\"").count() >= 2);
    assert!(
        html.contains("kept") && html.contains("67% of 900.0 k"),
        "kept fraction"
    );
    assert!(html.contains("not comparable with published MT-Bench"));
    // Absent data, absent sections.
    assert!(!html.contains("id=\"candidates\""));
    assert!(!html.contains("chart-ranking"));
    assert!(!html.contains("<script"), "no script");
    for fetch in ["<link", "src=", "href=\"http", "url(", "@import"] {
        assert!(!html.contains(fetch), "nothing fetched: {fetch}");
    }
}

#[test]
fn candidates_mtbench_and_a_ranking_light_up_when_reported() {
    let mut r0 = round(0, 600_000.0, 12.0);
    r0["candidates"] = json!([
        {"index": 0, "shape": {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_layers": 4},
         "params": 610_000, "tokens": 5000, "score": 2.1, "winner": false},
        {"shape": {"hidden_size": 112, "intermediate_size": 192, "num_attention_heads": 4, "num_layers": 3},
         "params": 590_000, "tokens": 5000, "score": 1.9, "winner": true, "perplexity": 11.0},
        {"shape": {"hidden_size": 80, "intermediate_size": 320, "num_attention_heads": 4, "num_layers": 4},
         "params": 600_000, "tokens": 5000, "score": 2.3, "winner": false},
    ]);
    r0["metrics"]["judge"]["mtbench"] =
        json!({"turn1": 6.5, "turn2": 5.5, "overall": 6.0, "invalid": 1});
    let mut c = campaign(vec![r0, round(1, 400_000.0, 15.0)]);
    // As the judge's status nests `judge.ranking.<model>.{elo, ci_low, ci_high, battles}`.
    c["rounds"][1]["metrics"]["judge"]["ranking"] = json!({
        "teacher": {"elo": 1000.0, "ci_low": 1000.0, "ci_high": 1000.0, "battles": 16},
        "round0": {"elo": 950.0, "ci_low": 900.0, "ci_high": 990.0, "battles": 16},
        "round1": {"elo": 880.0, "ci_low": 820.0, "ci_high": 930.0, "battles": 16},
    });
    c["rounds"][0]["metrics"]["judge"]["comparability"] =
        json!("MT-Bench (FastChat's prompts and grading, comparable with published MT-Bench)");
    let html = render(&c);
    assert!(html.contains("<section id=\"candidates\""));
    let k = figure(&html, "candidates-0").expect("candidates chart");
    assert!(k.contains("data-points=\"3\""));
    assert!(html.contains("class=\"winner\""));
    // The candidate with a perplexity joins the frontier.
    let f = figure(&html, "frontier").unwrap();
    assert!(f.contains("search candidates"));
    assert!(figure(&html, "mtbench-vs-params").is_some());
    assert!(html.contains("6.50 / 5.50 / 6.00"));
    let r = figure(&html, "ranking").expect("ranking chart");
    assert!(r.contains("data-points=\"3\"") && has_text(r, "round1"));
    // Best first in the table.
    let t = html.find("<td>teacher</td><td>1000</td>").unwrap();
    assert!(t < html.find("<td>round1</td><td>880</td>").unwrap());
    assert!(html.contains("comparable with published MT-Bench)."));
    assert!(!html.contains("not comparable with published MT-Bench"));
}

#[test]
fn an_all_ties_judge_is_called_out_not_shown_as_a_result() {
    let mut r0 = round(0, 600_000.0, 12.0);
    r0["metrics"]["judge"] = json!({"wins": 0, "ties": 12, "losses": 0, "win_rate": 0.5});
    let html = render(&campaign(vec![r0]));
    assert!(html.contains("every judgment was a tie"), "{html}");
    assert!(
        figure(&html, "judge-vs-params").is_none(),
        "ties are not plotted as a result"
    );
}

#[test]
fn a_new_campaign_renders_with_what_it_has_and_escapes_names() {
    let c = json!({"id": "c1", "name": "<x>", "state": "pending", "error": null,
                   "tasks": {}, "rounds": [{"index": 0, "state": "pending", "phase": "score",
                   "metrics": {"perplexity": null, "judge": {}, "distill": {}}, "tasks": []}]});
    let html = render(&c);
    assert!(html.contains("&lt;x&gt;") && !html.contains("<x>"));
    assert!(!html.contains("<figure"), "no chart without data");
    assert!(html.contains("<section id=\"rounds\""));
}
