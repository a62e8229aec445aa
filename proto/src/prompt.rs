//! The NewBie XML prompt language (placeholder; see the prompt-language work).
