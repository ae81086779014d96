"""The serving front: entry points (gRPC, HTTP, CLI) over one frontend, which talks to engine
cores through `EngineClient`s chosen by the Router."""
