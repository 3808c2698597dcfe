"""HTML report: one self-contained file with a section per stage."""
