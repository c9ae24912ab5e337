"""Pure torch sampling pieces (tiling, inversion, guidance); filled by later issues."""
