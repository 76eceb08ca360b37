"""One run from config to stored row: the loop (`run`: execute, run_one), `checks`, `resolve`, `overrides` (the
`--set` split), `plan` (dry run), `provenance`, `model_cache`, `phases`, the lifelong loop (`sequential`),
fetching the full task data (`download`) and the models' block counts (`depth`)."""
