"""One run from config to stored row (`run`: resolve, plan, execute), the lifelong loop (`sequential`),
fetching the full task data (`download`) and the models' block counts (`depth`)."""
