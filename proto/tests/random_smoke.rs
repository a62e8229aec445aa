//! A stable-toolchain stand-in for the fuzz target (`proto/fuzz`): feeds a few thousand random and
//! mutated inputs through `parse_prompt` and the three batch readers, checking the same invariants.
//! The generator is a fixed-seed xorshift, so a failure reproduces; set `FARM_SMOKE_SECONDS` to run
//! longer (it then keeps going until the time is up).

use std::io::BufReader;
use std::time::{Duration, Instant};

use farm_proto::batch::{BatchFormat, BatchReader};
use farm_proto::prompt::{looks_like_xml, parse_prompt, Diagnostic, PromptKind, PromptLimits};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "<",
    ">",
    "</",
    "/>",
    "&",
    ";",
    "&amp;",
    "&lt;",
    "&#x41;",
    "&#0;",
    "&bogus;",
    "\"",
    "'",
    "=",
    "\n",
    "\r\n",
    " ",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "<!DOCTYPE x>",
    "<!ENTITY e \"v\">",
    "<?xml version=\"1.0\"?>",
    "<?pi?>",
    "<character_1>",
    "</character_1>",
    "<n>",
    "</n>",
    "<general_tags>",
    "</general_tags>",
    "<caption>",
    "</caption>",
    "<image>",
    "</image>",
    "<style>",
    "<batch>",
    "</batch>",
    "<prompt>",
    "<prompt seed=\"1\">",
    "</prompt>",
    "seed=\"x\"",
    "{\"prompt\": \"",
    "\"}",
    "{",
    "}",
    "#",
    "\u{e9}",
    "\u{732b}",
    "\u{1F600}",
    "\u{FEFF}",
];

fn seeds() -> Vec<Vec<u8>> {
    let example = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/prompts.xml")).unwrap();
    vec![
        example,
        b"<character_1>\n<n>a</n><gender>1girl</gender>\n</character_1>\n<general_tags><count>1</count></general_tags>\n<caption>x &amp; y</caption>".to_vec(),
        b"{\"prompt\": \"<caption>a</caption>\", \"seed\": 1, \"cfg\": 4.5}\n\n{\"prompt\": \"1girl\"}\n".to_vec(),
        b"# c\n1girl, solo\n<image><caption>a</caption></image>\n".to_vec(),
        Vec::new(),
    ]
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 => input.splice(at..at, TOKENS[rng.below(TOKENS.len())].bytes()).for_each(drop),
            1 if !input.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 if at < input.len() => input[at] = rng.next() as u8,
            3 if !input.is_empty() => {
                let a = rng.below(input.len());
                let b = (a + rng.below(64)).min(input.len());
                let piece = input[a..b].to_vec();
                input.splice(at..at, piece).for_each(drop);
            }
            4 => input.insert(at, rng.next() as u8),
            _ => input.truncate(at),
        }
    }
}

fn in_bounds(src: &str, d: &Diagnostic) -> bool {
    let lines: Vec<&str> = src.split('\n').collect();
    d.line >= 1
        && (d.line as usize) <= lines.len()
        && d.column >= 1
        && (d.column as usize) <= lines[d.line as usize - 1].chars().count() + 1
}

fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let src = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    for limits in [PromptLimits::default(), PromptLimits { max_bytes: 64, max_depth: 2, max_characters: 1 }] {
        match parse_prompt(&text, &limits) {
            Ok(p) => {
                assert_eq!(p.text, src.trim());
                assert_eq!(p.kind == PromptKind::Xml, looks_like_xml(&p.text));
                assert!(p.warnings.iter().all(|w| in_bounds(src, w)), "{:?}", p.warnings);
            }
            Err(d) => assert!(in_bounds(src, &d), "{d} for {text:?}"),
        }
    }
    let lines = data.iter().filter(|&&b| b == b'\n').count() as u32 + 1;
    for format in [BatchFormat::Xml, BatchFormat::Jsonl, BatchFormat::Text] {
        let whole: Vec<_> = BatchReader::new(data, format).collect();
        let tiny: Vec<_> = BatchReader::new(BufReader::with_capacity(3, data), format).collect();
        assert_eq!(whole, tiny, "{format:?} for {text:?}");
        for item in &whole {
            match item {
                Ok(p) => assert!(!p.text.is_empty() && p.line >= 1 && p.line <= lines),
                Err(e) => assert!(e.line >= 1 && e.line <= lines && e.column >= 1, "{e} for {text:?}"),
            }
        }
    }
}

#[test]
fn mutated_inputs_never_panic() {
    let budget =
        std::env::var("FARM_SMOKE_SECONDS").ok().and_then(|s| s.parse().ok()).map(Duration::from_secs);
    let started = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let seeds = seeds();
    let mut runs = 0u64;
    loop {
        let mut input = seeds[rng.below(seeds.len())].clone();
        // Large seeds are cut to a window to keep each run short.
        if input.len() > 600 {
            let a = rng.below(input.len() - 600);
            input = input[a..a + 600].to_vec();
        }
        mutate(&mut rng, &mut input);
        check(&input);
        // Pure random bytes now and then.
        if runs.is_multiple_of(8) {
            let n = rng.below(200);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            check(&junk);
        }
        runs += 1;
        let done = match budget {
            Some(b) => started.elapsed() >= b,
            None => runs >= 3000,
        };
        if done {
            break;
        }
    }
    // The whole example file survives the checks unmutated too.
    check(&seeds[0]);
    eprintln!("{runs} mutated inputs in {:?}", started.elapsed());
}
