"""The library the stages, the CLI, the flow and the benches share: no stage logic here."""
