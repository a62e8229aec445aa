//! The example batch in `examples/prompts.xml` is valid.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use farm_proto::batch::{BatchFormat, BatchReader};
use farm_proto::prompt::{parse_prompt, PromptKind, PromptLimits};

#[test]
fn example_batch_parses_completely() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prompts.xml");
    assert_eq!(BatchFormat::from_path(&path), Some(BatchFormat::Xml));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(BatchFormat::sniff(&bytes[..64]), BatchFormat::Xml);

    let file = BufReader::new(File::open(&path).unwrap());
    let prompts: Vec<_> = BatchReader::new(file, BatchFormat::Xml)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("examples/prompts.xml: {e}"));
    assert_eq!(prompts.len(), 10);

    let seeds: HashSet<_> = prompts.iter().map(|p| p.seed.expect("every example has a seed")).collect();
    assert_eq!(seeds.len(), 10, "seeds must be distinct");

    let mut multi_character = 0;
    let mut image_roots = 0;
    let mut plain = 0;
    let mut captions = 0;
    for p in &prompts {
        let parsed = parse_prompt(&p.text, &PromptLimits::default())
            .unwrap_or_else(|d| panic!("prompt at line {}: {d}", p.line));
        assert!(parsed.warnings.is_empty(), "prompt at line {}: {:?}", p.line, parsed.warnings);
        assert_eq!(parsed.text, p.text);
        if parsed.characters.len() >= 2 {
            multi_character += 1;
        }
        if p.text.starts_with("<image>") || p.text.contains("\n    <image>") {
            image_roots += 1;
        }
        if parsed.kind == PromptKind::Plain {
            plain += 1;
        }
        if parsed.caption.is_some() {
            captions += 1;
        }
    }
    assert!(multi_character >= 3, "{multi_character} prompts with two or more characters");
    assert!(image_roots >= 1);
    assert_eq!(plain, 2, "one plain-tags and one natural-language prompt");
    assert!(captions >= 1);

    // Spot checks: the first prompt and its settings, the plain prompts.
    let first = &prompts[0];
    assert_eq!(first.line, 12);
    assert!(first.text.starts_with("<character_1>\n      <n>$hatsune_miku$</n>"));
    assert!(first.text.ends_with("</general_tags>"));
    assert_eq!(
        (first.width, first.height, first.steps, first.cfg_scale),
        (None, None, None, Some(4.5)),
        "sizes and steps come from the job defaults, so the demo can render small images"
    );
    assert!(prompts[4].text.starts_with("1girl, solo, silver_hair"));
    assert!(prompts[5].text.starts_with("A cozy cafe"));
    assert_eq!(prompts[6].negative_prompt.as_deref(), Some("blurry, \"extra fingers\""));
    let p3 = parse_prompt(&prompts[2].text, &PromptLimits::default()).unwrap();
    assert_eq!(p3.characters.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1, 2, 3]);
    let p4 = parse_prompt(&prompts[3].text, &PromptLimits::default()).unwrap();
    assert_eq!(p4.style.as_deref(), Some("watercolor, soft_colors"));
}
