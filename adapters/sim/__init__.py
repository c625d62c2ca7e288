"""Simulated payment providers (``acme``, ``globex``): real HTTP servers for development and
tests, started with ``adapters.sim.launch.start_sim``. See docs/providers.md."""
