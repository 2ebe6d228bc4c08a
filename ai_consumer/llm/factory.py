"""Pick the provider the settings ask for."""

from __future__ import annotations

from ai_consumer.llm import Provider
from ai_consumer.llm.simulated import SimulatedProvider
from chatpipe.settings import Settings


def make_provider(settings: Settings) -> Provider:
    if settings.llm_provider == "openai":
        from ai_consumer.llm.openai import OpenAIProvider

        return OpenAIProvider(settings)
    return SimulatedProvider(
        settings.sim_tokens, settings.sim_token_delay_ms, settings.sim_first_token_delay_ms
    )
