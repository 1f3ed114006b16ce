//! The MT-Bench modes with FastChat-format files (tests/fixtures/fastchat: FastChat's formats and
//! names, our own prose), the ranking, the length-controlled win rate and the reliability
//! measures, with scripted judges.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::backend::{Backend, BackendError};
use super::stats::{derive, metrics_for, sample_metrics, second_metrics};
use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fastchat")
}

fn prompt_set() -> fastchat::PromptSet {
    fastchat::load_prompts(&fixtures().join("judge_prompts.jsonl")).unwrap()
}

fn refs() -> BTreeMap<String, Vec<String>> {
    fastchat::load_references(&fixtures().join("reference_answer/reference.jsonl")).unwrap()
}

fn fixture_questions() -> Vec<Question> {
    load_questions(&fixtures().join("question.jsonl")).unwrap()
}

fn answers_for(qs: &[Question], tag: &str) -> Answers {
    Answers {
        model: tag.into(),
        answers: qs
            .iter()
            .map(|q| {
                let turns = (0..q.turns.len())
                    .map(|t| format!("{tag} says turn {} of {}", t + 1, q.id()))
                    .collect();
                (q.id(), turns)
            })
            .collect(),
    }
}

/// A judge answering by a rule over (system, user, sample), counting what it is asked.
struct Scripted<F: Fn(&str, &str, u32) -> String + Sync> {
    rule: F,
    asked: AtomicUsize,
    name: &'static str,
}

impl<F: Fn(&str, &str, u32) -> String + Sync> Backend for Scripted<F> {
    fn id(&self) -> String {
        self.name.into()
    }
    fn chat(&self, system: &str, user: &str) -> Result<String, BackendError> {
        self.sample(system, user, 0)
    }
    fn sample(&self, system: &str, user: &str, n: u32) -> Result<String, BackendError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok((self.rule)(system, user, n))
    }
}

fn scripted<F: Fn(&str, &str, u32) -> String + Sync>(rule: F) -> Scripted<F> {
    Scripted {
        rule,
        asked: AtomicUsize::new(0),
        name: "scripted",
    }
}

fn opts(samples: u32) -> JudgeOptions {
    JudgeOptions {
        concurrency: 4,
        retries: 1,
        samples,
    }
}

/// The round's figures as the coordinator derives them from the summed counts.
fn derived(m: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut s: BTreeMap<String, f64> = m
        .iter()
        .map(|(k, v)| (k.strip_prefix("sum.").unwrap_or(k).to_string(), *v))
        .collect();
    derive(&mut s);
    s
}

/// Whether a prompt is the multi-turn one (FastChat's multi-turn templates quote "### User:").
fn multi_turn(user: &str) -> bool {
    user.contains("### User:")
}

#[test]
fn turn_grades_7_and_5_give_turn_scores_7_and_5_and_overall_6_on_every_question() {
    let set = prompt_set();
    let r = refs();
    let p = MtBenchPrompts {
        prompts: set.for_mode(false).unwrap(),
        references: Some(&r),
    };
    let qs: Vec<Question> = fixture_questions()
        .into_iter()
        .filter(|q| q.turns.len() == 2)
        .collect();
    assert_eq!(qs.len(), 3);
    let (s, t) = (answers_for(&qs, "S"), answers_for(&qs, "T"));
    let jobs = p
        .single_jobs(&qs, &[("student", &s), ("baseline", &t)])
        .unwrap();
    // Two models, three questions, two turns each.
    assert_eq!(jobs.len(), 12);
    let judge = scripted(|_, user, _| {
        if multi_turn(user) {
            "The second answer is weaker. Rating: [[5]]".into()
        } else {
            "A solid first answer. Rating: [[7]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    assert_eq!(judge.asked.load(Ordering::SeqCst), 12);
    let m = derived(&metrics_for(Mode::MtBench, &js, &s, &t, true));
    assert_eq!(m["judge.mtbench.turn1"], 7.0);
    assert_eq!(m["judge.mtbench.turn2"], 5.0);
    assert_eq!(m["judge.mtbench.overall"], 6.0);
    assert_eq!(m["judge.mtbench.invalid"], 0.0);
    assert_eq!(m["judge.teacher_mtbench.overall"], 6.0);
    // Every question on its own: 7 and 5.
    for q in &qs {
        let mine: Vec<f64> = js
            .iter()
            .filter(|j| j.question_id == q.id() && j.slot == "student")
            .map(|j| match j.verdict {
                Verdict::Score(s) => s,
                _ => f64::NAN,
            })
            .collect();
        assert_eq!(mine, vec![7.0, 5.0], "question {}", q.id());
    }
    // Equal grades everywhere: every turn a tie.
    assert_eq!(m["judge.ties"], 6.0);
}

#[test]
fn unparsed_turn_grades_are_counted_and_left_out_of_the_score() {
    let set = prompt_set();
    let r = refs();
    let p = MtBenchPrompts {
        prompts: set.for_mode(false).unwrap(),
        references: Some(&r),
    };
    let qs = fixture_questions();
    let (s, t) = (answers_for(&qs, "S"), answers_for(&qs, "T"));
    let jobs = p.single_jobs(&qs, &[("student", &s)]).unwrap();
    // 3 two-turn questions and one single-turn: FastChat grades 7 turns.
    assert_eq!(jobs.len(), 7);
    // The roleplay question's second turn never gets a grade; the others 7 and 5.
    let judge = scripted(|_, user, _| {
        if multi_turn(user) && user.contains("ship's cook") {
            "I would rather not grade this.".into()
        } else if multi_turn(user) {
            "[[5]]".into()
        } else {
            "[[7]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    // The unparsed turn was asked once more (retries = 1), then recorded as unparsed.
    assert_eq!(judge.asked.load(Ordering::SeqCst), 8);
    let m = derived(&metrics_for(Mode::MtBench, &js, &s, &t, true));
    assert_eq!(m["judge.mtbench.invalid"], 1.0);
    assert_eq!(m["judge.mtbench.turn1"], 7.0);
    assert_eq!(m["judge.mtbench.turn1_n"], 4.0);
    assert_eq!(m["judge.mtbench.turn2"], 5.0);
    assert_eq!(m["judge.mtbench.turn2_n"], 2.0);
    assert_eq!(m["judge.mtbench.overall"], (4.0 * 7.0 + 2.0 * 5.0) / 6.0);
}

#[test]
fn a_math_prompt_carries_its_reference_and_the_multi_turn_template() {
    let set = prompt_set();
    let r = refs();
    let p = MtBenchPrompts {
        prompts: set.for_mode(false).unwrap(),
        references: Some(&r),
    };
    let qs = fixture_questions();
    let s = answers_for(&qs, "S");
    let jobs = p.single_jobs(&qs, &[("student", &s)]).unwrap();
    let math: Vec<&Job> = jobs.iter().filter(|j| j.question_id == "111").collect();
    assert_eq!(math.len(), 2);
    let (t1, t2) = (math[0], math[1]);
    assert_eq!((t1.turn, t2.turn), (1, 2));
    assert_eq!(t1.template, "single-math-v1");
    assert!(t1.user.contains("The area is 7 * 7 = 49."), "{}", t1.user);
    assert!(t1.user.contains("S says turn 1 of 111"), "{}", t1.user);
    assert!(
        !t1.user.contains("196"),
        "turn 1 shows only the first reference"
    );
    assert_eq!(t2.template, "single-math-v1-multi-turn");
    let multi = &set.prompts["single-math-v1-multi-turn"];
    assert_eq!(t2.system, multi.system_prompt);
    for needle in [
        "<|Reference solutions|>",
        "The area is 7 * 7 = 49.",
        "Side 14 gives 14 * 14 = 196.",
        "A square has side 7. What is its area?",
        "And the area of a square with twice that side?",
        "S says turn 1 of 111",
        "S says turn 2 of 111",
    ] {
        assert!(
            t2.user.contains(needle),
            "{needle:?} missing from\n{}",
            t2.user
        );
    }
    // A question outside the reference categories uses the general prompts, no reference.
    let w: Vec<&Job> = jobs.iter().filter(|j| j.question_id == "81").collect();
    assert_eq!(w[0].template, "single-v1");
    assert_eq!(w[1].template, "single-v1-multi-turn");
    assert!(!w[1].user.contains("Reference"));
    // The coding question is graded against its reference too.
    let c = jobs.iter().find(|j| j.question_id == "121").unwrap();
    assert!(c.user.contains("return a if a >= b else b"), "{}", c.user);
}

#[test]
fn unknown_prompt_names_missing_references_and_malformed_lines_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A prompt file without the multi-turn math prompt.
    let text = std::fs::read_to_string(fixtures().join("judge_prompts.jsonl")).unwrap();
    let short: String = text
        .lines()
        .filter(|l| !l.contains("\"single-math-v1-multi-turn\""))
        .map(|l| format!("{l}\n"))
        .collect();
    let p = dir.path().join("judge_prompts.jsonl");
    std::fs::write(&p, short).unwrap();
    let e = fastchat::load_prompts(&p)
        .unwrap()
        .for_mode(false)
        .unwrap_err();
    assert!(
        e.contains("\"single-math-v1-multi-turn\"") && e.contains("judge_prompts.jsonl"),
        "{e}"
    );
    // A malformed line, by number.
    std::fs::write(
        &p,
        format!("{}\n{{\"name\": \"x\"}}\n", text.lines().next().unwrap()),
    )
    .unwrap();
    let e = fastchat::load_prompts(&p).unwrap_err();
    assert!(
        e.contains("judge_prompts.jsonl:2") && e.contains("prompt_template"),
        "{e}"
    );
    // A math question missing from the reference file.
    let set = prompt_set();
    let mut r = refs();
    r.remove("111");
    let mp = MtBenchPrompts {
        prompts: set.for_mode(false).unwrap(),
        references: Some(&r),
    };
    let qs = fixture_questions();
    let e = mp
        .single_jobs(&qs, &[("student", &answers_for(&qs, "S"))])
        .unwrap_err();
    assert!(
        e.contains("question 111") && e.contains("judge.reference_answers"),
        "{e}"
    );
    // A reference with one turn for a two-turn math question: turn 2 cannot be graded.
    let mut r1 = refs();
    r1.insert("111".into(), vec!["49".into()]);
    let mp = MtBenchPrompts {
        prompts: set.for_mode(false).unwrap(),
        references: Some(&r1),
    };
    let e = mp
        .single_jobs(&qs, &[("student", &answers_for(&qs, "S"))])
        .unwrap_err();
    assert!(
        e.contains("111") && e.contains("reference") && e.contains("turn 2"),
        "{e}"
    );
    // A prompt of the wrong type under a known name.
    let swapped = text.replace(
        "\"name\": \"single-v1\", \"type\": \"single\"",
        "\"name\": \"single-v1\", \"type\": \"pairwise\"",
    );
    std::fs::write(&p, swapped).unwrap();
    let e = fastchat::load_prompts(&p)
        .unwrap()
        .for_mode(false)
        .unwrap_err();
    assert!(e.contains("\"single-v1\"") && e.contains("type"), "{e}");
}

/// The answer in position A or B of a pairwise prompt (built-in or FastChat fixture template).
fn answer_in(user: &str, pos: char) -> String {
    for (start, end) in [
        (format!("### Assistant {pos}:\n"), "\n\n"),
        (format!("[Assistant {pos} replied]\n"), "\n[End of"),
    ] {
        if let Some(i) = user.find(&start) {
            let rest = &user[i + start.len()..];
            return rest[..rest.find(end).unwrap_or(rest.len())].to_string();
        }
    }
    panic!("no answer {pos} in {user}")
}

#[test]
fn fastchat_pairwise_per_turn_in_both_orders() {
    let set = prompt_set();
    let r = refs();
    let p = MtBenchPrompts {
        prompts: set.for_mode(true).unwrap(),
        references: Some(&r),
    };
    let qs = fixture_questions();
    let (s, t) = (answers_for(&qs, "S"), answers_for(&qs, "T"));
    let pp = PairPrompts::FastChat(&p);
    let jobs = pair_jobs(&pp, &qs, ("student", &s), ("baseline", &t), "").unwrap();
    // 7 judged turns, both orders.
    assert_eq!(jobs.len(), 14);
    assert!(jobs.iter().any(|j| j.template == "pair-math-v1-multi-turn"
        && j.user.contains("Side 14 gives 14 * 14 = 196.")));
    // A judge that prefers the student's answer wherever it is shown.
    let judge = scripted(|_, user, _| {
        if answer_in(user, 'A').starts_with('S') {
            "[[A]]".into()
        } else {
            "[[B]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let m = derived(&metrics_for(Mode::MtBenchPairwise, &js, &s, &t, true));
    assert_eq!(m["judge.wins"], 7.0);
    assert_eq!(m["judge.win_rate"], 1.0);
    assert_eq!(m["judge.position_consistency"], 1.0);
}

/// Answers of a model with a hidden quality: the judge prefers the higher one.
fn quality_answers(qs: &[Question], quality: u32) -> Answers {
    Answers {
        model: format!("q{quality}"),
        answers: qs
            .iter()
            .map(|q| (q.id(), vec![format!("quality {quality} on {}", q.id())]))
            .collect(),
    }
}

fn quality_of(answer: &str) -> u32 {
    answer
        .strip_prefix("quality ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The number in "Question N" of a prompt.
fn question_number(user: &str) -> u32 {
    user.split("Question ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn a_ranking_asks_only_for_new_pairs_and_orders_the_models() {
    let qs: Vec<Question> = (0..30)
        .map(|i| Question {
            question_id: serde_json::json!(i),
            category: "writing".into(),
            turns: vec![format!("Question {i}")],
            reference: None,
        })
        .collect();
    let template = template(Mode::Pairwise).unwrap();
    let pp = PairPrompts::Builtin {
        template,
        format: Format::Pairwise,
    };
    // The judge prefers the better answer, except on a third of the questions where it prefers
    // position A: strengths are recovered in order, not perfectly separated.
    let judge = scripted(|_, user, _| {
        let (a, b) = (
            quality_of(&answer_in(user, 'A')),
            quality_of(&answer_in(user, 'B')),
        );
        if question_number(user).is_multiple_of(3) || a > b {
            "[[A]]".into()
        } else if b > a {
            "[[B]]".into()
        } else {
            "[[C]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let mut models = vec![
        ("teacher".to_string(), quality_answers(&qs, 9)),
        ("round0".to_string(), quality_answers(&qs, 6)),
    ];
    let jobs0 = ranking::ranking_jobs(&pp, &qs, &models).unwrap();
    assert_eq!(jobs0.len(), 60);
    judge_all(&jobs0, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    assert_eq!(judge.asked.load(Ordering::SeqCst), 60);
    // Round 1 adds a student: 2 new pairs × 30 questions × 2 orders, nothing else.
    models.push(("round1".to_string(), quality_answers(&qs, 3)));
    let jobs1 = ranking::ranking_jobs(&pp, &qs, &models).unwrap();
    assert_eq!(jobs1.len(), 180);
    let js = judge_all(&jobs1, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    assert_eq!(judge.asked.load(Ordering::SeqCst), 60 + 120);
    let mut m = derived(&ranking::battle_metrics(&js));
    distillery_proto::judge_stats::elo_drop(&mut m, 1);
    let elo = |n: &str| m[&format!("judge.ranking.{n}.elo")];
    assert_eq!(elo("teacher"), 1000.0);
    assert!(
        elo("teacher") > elo("round0") && elo("round0") > elo("round1"),
        "{m:?}"
    );
    assert!(m["judge.elo_drop"] > 0.0);
    // Each pair: 60 battles; each model takes part in two pairs.
    assert_eq!(m["judge.ranking.round1.battles"], 120.0);
}

/// One campaign's figures with a judge that always prefers the longer answer: (raw win rate,
/// length-controlled win rate).
fn always_longer_figures(seed: u64) -> (f64, f64) {
    let mut rng = distillery_proto::bradley_terry::Lcg::new(seed);
    let n = 200;
    let qs: Vec<Question> = (0..n)
        .map(|i| Question {
            question_id: serde_json::json!(i),
            category: "writing".into(),
            turns: vec![format!("Question {i}")],
            reference: None,
        })
        .collect();
    // The student tends to write more: 100–300 characters against the baseline's 20–220.
    let mut s = Answers::default();
    let mut t = Answers::default();
    for q in &qs {
        let ls = 100 + (rng.next_f64() * 200.0) as usize;
        let lb = 20 + (rng.next_f64() * 200.0) as usize;
        s.answers.insert(q.id(), vec!["s".repeat(ls)]);
        t.answers.insert(q.id(), vec!["b".repeat(lb)]);
    }
    let jobs = jobs(Mode::Pairwise, &qs, &s, &t).unwrap();
    let judge = scripted(|_, user, _| {
        let (a, b) = (answer_in(user, 'A').len(), answer_in(user, 'B').len());
        if a > b {
            "A is longer, so better. [[A]]".into()
        } else if b > a {
            "B is longer, so better. [[B]]".into()
        } else {
            "[[C]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let m = derived(&metrics_for(Mode::Pairwise, &js, &s, &t, true));
    assert!(
        !m.keys().any(|k| k.starts_with("judge.lc.")),
        "raw points dropped"
    );
    (m["judge.win_rate"], m["judge.lc_win_rate"])
}

/// Five campaigns of 200 questions each (measured: raw 0.81–0.85, length-controlled 0.55–0.60).
/// A judge that decides by length alone separates the outcomes perfectly, so the
/// length-controlled figure rests on the prior and the few questions of nearly equal length: it
/// lands near, not at, 0.5, with at least two thirds of the raw rate's distance from 0.5 gone.
#[test]
fn an_always_longer_judge_has_a_raw_win_rate_far_from_half_and_a_length_controlled_one_near_it() {
    let figures: Vec<(f64, f64)> = (1..=5).map(always_longer_figures).collect();
    let mean =
        |f: fn(&(f64, f64)) -> f64| figures.iter().map(f).sum::<f64>() / figures.len() as f64;
    let (raw, lc) = (mean(|x| x.0), mean(|x| x.1));
    eprintln!("always-longer judge: (raw, length-controlled) per campaign {figures:.3?}; mean raw {raw:.3}, mean length-controlled {lc:.3}");
    for (r, l) in &figures {
        assert!(*r > 0.75, "raw {r}");
        assert!((l - 0.5).abs() < 0.1, "length-controlled {l}");
        assert!(
            (l - 0.5).abs() < (r - 0.5) / 3.0,
            "raw {r}, length-controlled {l}"
        );
    }
    assert!((lc - 0.5).abs() < 0.1, "mean length-controlled {lc}");
}

#[test]
fn repeated_samples_give_agreement_and_alpha_and_a_second_judge_gives_kappa() {
    let qs: Vec<Question> = (0..20)
        .map(|i| Question {
            question_id: serde_json::json!(i),
            category: "writing".into(),
            turns: vec![format!("Question {i}")],
            reference: None,
        })
        .collect();
    let (s, t) = (answers_for(&qs, "S"), answers_for(&qs, "T"));
    let jobs = jobs(Mode::Pairwise, &qs, &s, &t).unwrap();
    // Samples 0 and 1 always say A; sample 2 says B on the prompts with an even question.
    let judge = scripted(|_, user, n| {
        if n == 2 && question_number(user).is_multiple_of(2) {
            "[[B]]".into()
        } else {
            "[[A]]".into()
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(3), &|_, _, _| {}).unwrap();
    assert_eq!(judge.asked.load(Ordering::SeqCst), 3 * jobs.len());
    assert!(js.iter().all(|j| j.samples.len() == 3));
    // The majority is A everywhere.
    assert!(js
        .iter()
        .all(|j| j.verdict == Verdict::Pairwise(parse::Pairwise::A)));
    let disagreeing = js
        .iter()
        .filter(|j| j.samples.contains(&Verdict::Pairwise(parse::Pairwise::B)))
        .count();
    assert!(disagreeing > 0);
    let m = derived(&sample_metrics(&js, 3));
    // Per prompt of 3 samples: 6 ordered pairs with weight 1/2; a prompt with one B has 2 of
    // its 6 pairs agreeing.
    let n = js.len() as f64;
    let want = (n - disagreeing as f64 + disagreeing as f64 / 3.0) / n;
    assert!((m["judge.samples.agreement"] - want).abs() < 1e-12, "{m:?}");
    assert!(m["judge.samples.alpha"] < 0.5, "{m:?}");
    assert_eq!(m["judge.samples.k"], 3.0);

    // A second judge (another identity: its own cache entries) that agrees on the
    // student-first prompts and says B on the others.
    let mut second = scripted(|_, user, _| {
        if answer_in(user, 'A').starts_with('S') {
            "[[A]]".into()
        } else {
            "[[B]]".into()
        }
    });
    second.name = "second";
    let js1 = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let js2 = judge_all(&jobs, &second, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let m = derived(&second_metrics(&js1, &js2));
    assert_eq!(m["judge.second.n"], 40.0);
    assert_eq!(m["judge.second.agreement"], 0.5);
    // Judge 1 always says A: chance agreement 0.5, κ = 0.
    assert_eq!(m["judge.second.kappa"], 0.0);
}

#[test]
fn arena_hard_verdicts_count_strong_wins_three_times_in_the_ranking_and_once_in_the_win_rate() {
    let qs: Vec<Question> = (0..4)
        .map(|i| Question {
            question_id: serde_json::json!(i),
            category: "writing".into(),
            turns: vec![format!("Question {i}")],
            reference: None,
        })
        .collect();
    let five = PairPrompts::Builtin {
        template: five_level_template().unwrap(),
        format: Format::FiveLevel,
    };
    let models = vec![
        ("teacher".to_string(), quality_answers(&qs, 9)),
        ("round0".to_string(), quality_answers(&qs, 3)),
    ];
    // The teacher is much better on even questions, somewhat better on odd ones.
    let judge = scripted(|_, user, _| {
        let teacher_is_a = quality_of(&answer_in(user, 'A')) == 9;
        let strong = question_number(user).is_multiple_of(2);
        match (teacher_is_a, strong) {
            (true, true) => "[[A>>B]]".into(),
            (true, false) => "[[A>B]]".into(),
            (false, true) => "[[B>>A]]".into(),
            (false, false) => "[[B>A]]".into(),
        }
    });
    let jobs = ranking::ranking_jobs(&five, &qs, &models).unwrap();
    assert!(jobs[0].system.contains("[[A>>B]]"));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = judge_all(&jobs, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let m = ranking::battle_metrics(&js);
    // 8 games: 4 strong (×3) and 4 plain, all won by the teacher.
    assert_eq!(
        m["sum.judge.battles.teacher.round0.a_wins"],
        4.0 * 3.0 + 4.0
    );
    assert_eq!(m["sum.judge.battles.teacher.round0.b_wins"], 0.0);
    // Against the baseline, a strong win is one win.
    let (s, t) = (quality_answers(&qs, 3), quality_answers(&qs, 9));
    let main = builtin_jobs(Mode::Pairwise, true, &qs, &s, &t).unwrap();
    let js = judge_all(&main, &judge, &cache, &opts(1), &|_, _, _| {}).unwrap();
    let d = derived(&metrics_for(Mode::Pairwise, &js, &s, &t, true));
    assert_eq!((d["judge.losses"], d["judge.wins"]), (4.0, 0.0));
}
