"""Analysis over the result tables only (rankings, overlap, figures, report). Never imports torch."""
