//! Property tests of `parse_prompt`.

mod common;

use common::{gen_plain, gen_prompt, in_bounds, position_of};
use farm_proto::prompt::{codes, looks_like_xml, parse_prompt, PromptKind, PromptLimits};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Generated well-formed prompts parse, keep their text verbatim (trimmed) and give the structure
    /// they were built from.
    #[test]
    fn generated_prompts_parse_and_round_trip(g in gen_prompt()) {
        let p = parse_prompt(&g.input, &PromptLimits::default())
            .map_err(|d| TestCaseError::fail(format!("{d} in {:?}", g.input)))?;
        prop_assert_eq!(&p.text, g.input.trim());
        prop_assert_eq!(p.kind, PromptKind::Xml);
        prop_assert_eq!(&p.characters, &g.characters);
        prop_assert_eq!(&p.general_tags, &g.general_tags);
        prop_assert_eq!(&p.caption, &g.caption);
        prop_assert_eq!(&p.style, &g.style);
        prop_assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        prop_assert!(p.loose_text.is_empty(), "{:?}", p.loose_text);
        // Parsing the text the encoders get gives the same result.
        let again = parse_prompt(&p.text, &PromptLimits::default()).unwrap();
        prop_assert_eq!(again.characters, p.characters);
    }

    /// Renaming one closing tag is an error reported exactly at that tag.
    #[test]
    fn renamed_closing_tag_is_reported_at_that_tag(g in gen_prompt(), pick in any::<prop::sample::Index>()) {
        let (offset, name) = pick.get(&g.ends).clone();
        let mut s = g.input.clone();
        s.insert(offset + 2 + name.len(), 'q');
        let d = parse_prompt(&s, &PromptLimits::default()).expect_err("renamed closing tag must fail");
        prop_assert_eq!(d.code, codes::XML_SYNTAX);
        prop_assert_eq!((d.line, d.column), position_of(&s, offset), "{} in {:?}", d, s);
        let expected_name = format!("</{name}q>");
        prop_assert!(d.message.contains(&expected_name), "{}", d.message);
    }

    /// Deleting one closing tag, or the `>` of one start tag, is an error inside the text.
    #[test]
    fn one_broken_tag_is_an_error_inside_the_text(
        g in gen_prompt(),
        pick in any::<prop::sample::Index>(),
        delete_end in any::<bool>(),
    ) {
        let mut s = g.input.clone();
        if delete_end {
            let (offset, name) = pick.get(&g.ends).clone();
            s.replace_range(offset..offset + name.len() + 3, "");
        } else {
            let (offset, name) = pick.get(&g.starts).clone();
            s.remove(offset + 1 + name.len());
        }
        let d = parse_prompt(&s, &PromptLimits::default())
            .err()
            .ok_or_else(|| TestCaseError::fail(format!("no error for {s:?}")))?;
        prop_assert_eq!(d.code, codes::XML_SYNTAX, "{}", d);
        prop_assert!(in_bounds(&s, &d), "{} out of bounds in {:?}", d, s);
    }

    /// Plain prompts are accepted as they are.
    #[test]
    fn plain_prompts_are_plain(s in gen_plain(), lead in "[ \n\t]{0,3}", trail in "[ \n\t]{0,3}") {
        prop_assume!(!s.is_empty());
        let input = format!("{lead}{s}{trail}");
        let p = parse_prompt(&input, &PromptLimits::default()).unwrap();
        prop_assert_eq!(p.kind, PromptKind::Plain);
        prop_assert_eq!(p.text, s);
    }

    /// Arbitrary strings never panic; results are consistent and positions point inside the input.
    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        check_any(&s, &PromptLimits::default())?;
    }

    /// Markup-heavy strings never panic either, under default and tiny limits.
    #[test]
    fn xmlish_strings_never_panic(
        s in "([<>/&;#!?\\[\\]\"'=\n -]|[a-z_0-9]{1,12}|character_1|general_tags|image|caption|&amp;|<!--|-->|<!\\[CDATA\\[|\\]\\]>|<!DOCTYPE|<!ENTITY|\u{e9}|\u{732b}){0,80}",
        tiny in any::<bool>(),
    ) {
        let limits = if tiny { PromptLimits { max_bytes: 40, max_depth: 2, max_characters: 1 } } else { PromptLimits::default() };
        check_any(&s, &limits)?;
    }

    /// Mutated well-formed prompts never panic.
    #[test]
    fn mutated_prompts_never_panic(g in gen_prompt(), at in any::<prop::sample::Index>(), junk in "[<>/&;!?\"=\n]{1,3}") {
        let mut s = g.input.clone();
        let mut i = at.index(s.len() + 1);
        while !s.is_char_boundary(i) { i -= 1; }
        s.insert_str(i, &junk);
        check_any(&s, &PromptLimits::default())?;
    }
}

fn check_any(s: &str, limits: &PromptLimits) -> Result<(), TestCaseError> {
    let src = s.strip_prefix('\u{FEFF}').unwrap_or(s);
    match parse_prompt(s, limits) {
        Ok(p) => {
            prop_assert_eq!(p.text.as_str(), src.trim());
            prop_assert!(!p.text.is_empty());
            prop_assert!(p.text.len() <= limits.max_bytes);
            prop_assert_eq!(p.kind == PromptKind::Xml, looks_like_xml(&p.text));
            prop_assert!(p.characters.len() <= limits.max_characters);
            for w in &p.warnings {
                prop_assert_eq!(w.code, codes::UNKNOWN_TAG);
                prop_assert!(in_bounds(src, w), "{} out of bounds", w);
            }
        }
        Err(d) => {
            prop_assert!(in_bounds(src, &d), "{} out of bounds in {:?}", d, s);
            prop_assert!(!d.message.is_empty());
        }
    }
    Ok(())
}
