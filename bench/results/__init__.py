"""Reading stored rows: variants of a config, the regression thresholds and their derivation from a
campaign, and the HTML/Markdown report."""
