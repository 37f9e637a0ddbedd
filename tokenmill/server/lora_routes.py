"""LoRA adapters over HTTP: /v1/models lists them beside the base model, and with
--enable-lora-runtime-updating `POST /v1/load_lora_adapter` {lora_name, lora_path} and
`POST /v1/unload_lora_adapter` {lora_name} change them while serving (404 otherwise: loading reads folders on
the server's disk, which only its operator may allow). A request picks an adapter with its `model` field."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.server.errors import APIError
from tokenmill.server.serving_common import ServerState

MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    lora_path: Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


def adapter_cards(state: ServerState) -> list[dict[str, Any]]:
    """/v1/models entries of the loaded adapters."""
    return [{"id": name, "object": "model", "created": state.created, "owned_by": "tokenmill",
             "parent": state.model_name, "max_model_len": state.engine.max_model_len}
            for name in state.engine.engine.lora.names()]


def add_lora_routes(router: APIRouter, state: ServerState, runtime_updating: bool, responses: dict) -> None:
    registry = state.engine.engine.lora
    if runtime_updating and not registry.enabled:
        raise ValueError("--enable-lora-runtime-updating needs --enable-lora")
    if state.model_name in registry.names():  # requests naming it would get the base model, never the adapter
        raise ValueError(f"--lora-modules: the adapter name {state.model_name!r} is the served model's name")

    def check_enabled() -> None:
        if not runtime_updating:
            raise APIError(404, "loading and unloading LoRA adapters at run time is off; start the server with "
                                "--enable-lora-runtime-updating", type_="not_found_error", code="not_found")

    @router.post("/load_lora_adapter", responses=responses)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> dict[str, Any]:
        check_enabled()
        if body.lora_name == state.model_name or body.lora_name in registry.names():
            raise APIError(400, f"lora_name: {body.lora_name!r} is already served", param="lora_name")
        adapter = await state.engine.run_prepare(registry.read, body.lora_path)  # reads files: off the loop
        await state.engine.run_in_engine(registry.add, body.lora_name, adapter)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded"}

    @router.post("/unload_lora_adapter", responses=responses)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> dict[str, Any]:
        check_enabled()
        if body.lora_name not in registry.names():
            raise APIError(404, f"lora_name: no adapter named {body.lora_name!r} is loaded", type_="not_found_error",
                           param="lora_name", code="lora_not_found")
        await state.engine.run_in_engine(registry.remove, body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}
