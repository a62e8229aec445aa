//! NewBie-image-Exp0.1 model code: one struct per block, field paths equal to checkpoint key names.
