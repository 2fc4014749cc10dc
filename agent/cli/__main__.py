"""`python -m agent.cli` is `meshagent`."""

from agent.cli.main import main

main()
