"""Adapters over HTTP (vLLM's shapes): the served adapters by name (the request's `model` picks one), their
/v1/models cards (parent = the base model), and POST /v1/load_lora_adapter / /v1/unload_lora_adapter
({"lora_name", "lora_path"}; under /v1, so behind the API key). An adapter that cannot be served is a 400 naming
why and changes nothing; an unknown name is a 404."""

from __future__ import annotations

import itertools

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from ..lora import AdapterError, LoRARequest
from . import protocol as P
from .errors import APIError


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    model_config = {"extra": "forbid"}


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None
    model_config = {"extra": "forbid"}


class LoRARegistry:
    """name -> LoRARequest of the served adapters; ids are handed out here, once each."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def new_request(self, name: str, path: str) -> LoRARequest:
        return LoRARequest(name, next(self._ids), path)

    def cards(self, base: str, max_model_len: int) -> list[P.ModelCard]:
        return [P.ModelCard(id=name, root=name, parent=base, max_model_len=max_model_len)
                for name in self.by_name]


class OpenAIServingLoRA:
    def __init__(self, engine, registry: LoRARegistry, base_name: str, parse):
        self.engine, self.registry, self.base_name, self.parse = engine, registry, base_name, parse

    def _enabled(self) -> None:
        if not self.registry.enabled:
            raise APIError(400, "LoRA is not enabled on this server: start it with --enable-lora")

    async def load(self, request: Request) -> PlainTextResponse:
        self._enabled()
        body: LoadLoRAAdapterRequest = await self.parse(request, LoadLoRAAdapterRequest)
        name = body.lora_name
        if name in self.registry.by_name or name == self.base_name:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            lora = self.registry.new_request(name, body.lora_path)
            await self.engine.add_lora(lora)
        except (AdapterError, ValueError) as e:
            raise APIError(400, f"cannot load LoRA adapter '{name}': {e}", param="lora_path") from None
        self.registry.by_name[name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> PlainTextResponse:
        self._enabled()
        body: UnloadLoRAAdapterRequest = await self.parse(request, UnloadLoRAAdapterRequest)
        lora = self.registry.by_name.get(body.lora_name)
        if lora is None or (body.lora_int_id is not None and body.lora_int_id != lora.lora_int_id):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        del self.registry.by_name[body.lora_name]
        await self.engine.remove_lora(lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
