"""The engine core in its own process (vLLM v1's EngineCore / EngineCoreClient / AsyncLLM over AsyncMPClient):
core_output.py + engine_core.py (scheduler and model, token ids only), core_proc.py (the process and its loop),
messages.py + serial.py (the wire: msgpack, one message per step, token arrays as raw frames), core_client.py (a
front's sockets and the core process), front_output.py (text, stop strings, RequestOutputs in the API process),
async_mp.py (AsyncMPLLM: AsyncLLM's API over all of it)."""
