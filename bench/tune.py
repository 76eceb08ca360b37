"""`python -m bench.tune`: kept as the documented entry point; the tool is `bench.commands.tune`."""

from bench.commands.tune import main

if __name__ == "__main__":
    main()
