"""A loaded GGUF model: weights, vocabulary, metadata, tokenizer."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from .._exceptions import ClosedError, ContextError, InvalidConfigError, ModelLoadError, TemplateError, TokenizeError
from ..gguf._preflight import check_model_file, preflight
from ..native import _library, _rpc_relay
from ..native._devices import DeviceOptions
from ..native._heap import give_back_memory
from ..native._owned import Owned
from ._arguments import check_token_id, check_token_ids

if TYPE_CHECKING:
    from ._embed import Embedder
    from ._lora import LoraAdapter, LoraSpec
    from ._media import Projector
    from ._rerank import Ranked


__all__ = ["Model", "TokenInfo", "check_prompt", "tokenize_prompt"]

TokenInfo = tuple[bytes, "str | None", bool]  # a token's bytes, their text if whole characters, ends generation

class Model(Owned):
    """A GGUF model loaded by llama.cpp. Share one Model between many Contexts.

    Use ``Model.load(path_or_name)``; close it with ``close()`` or a ``with`` block
    (garbage collection frees it too).
    """

    _kind = "model"
    _close_order = 2
    _used_unguarded = True  # tokenising takes no guard

    def __init__(self, library: Any, ptr: Any, path: Path, *, offloaded: bool = False,
                 vocab_only: bool = False, chat_template: str | None = None) -> None:
        self._library = library
        self._chat_template = chat_template  # overrides the GGUF's
        self.vocab_only = vocab_only  # loaded without weights: a tokenizer only, no context can use it
        # Layers on a GPU or an RPC server: its contexts need not take turns on the CPU (Compute.lock_for).
        self.offloaded = offloaded
        lib = library.lib
        # A cache that cannot drop its last tokens (sliding window, recurrent state): llama-server
        # then decodes a prompt's last tokens in batches of their own (see prompt_breaks).
        self.needs_checkpoints = bool(lib.llama_model_n_swa(ptr) > 0 or lib.llama_model_is_recurrent(ptr)
                                      or lib.llama_model_is_hybrid(ptr))
        self._own(library.ffi, ptr, library.lib.llama_model_free)
        self.path = path
        self._vocab = library.lib.llama_model_get_vocab(ptr)
        self._n_vocab = library.lib.llama_vocab_n_tokens(self._vocab)  # fixed: token ids are checked against it
        self._contexts: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pieces: dict[int, TokenInfo] = {}  # token id -> what streaming needs of it; immutable, so cached
        self._eog: tuple[int, ...] | None = None  # every end-of-generation token, found on first use
        self._lock = threading.Lock()
        self._embedders: dict[tuple[int, int], Embedder] = {}  # (pooling, batch size) -> embedding context
        self._embed_lock = threading.Lock()  # creating one (it registers itself, which takes _lock)
        self.lora: list[LoraAdapter] = []  # LoRA adapters, by id, each with its default scale (_lora.py)
        self.projector: Projector | None = None  # images and audio in (Model.load's mmproj; _media.py)
        self._relays = _rpc_relay.Relays()  # of its RPC servers, checked after each decode

    # --- loading --------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike[str], *, n_gpu_layers: int = 0, use_mmap: bool = True,
             vocab_only: bool = False, chat_template: str | os.PathLike[str] | None = None, main_gpu: int = 0,
             split_mode: str = "layer", tensor_split: Sequence[float] | None = None,
             rpc_servers: Sequence[str] | None = None, lora: LoraSpec | None = None,
             mmproj: str | os.PathLike[str] | Literal[False] | None = None) -> Model:
        """Load a model from a ``.gguf`` path, or by name (e.g. ``"smollm2:135m"``, downloaded once).

        ``chat_template`` (Jinja text, or the path of a ``.jinja`` file) replaces the GGUF's own
        template, as llama-server's ``--chat-template-file`` does.

        Offloading, as llama.cpp's ``-ngl``, ``--main-gpu``, ``--split-mode``, ``--tensor-split`` and
        ``--rpc``: ``n_gpu_layers`` layers (-1: all) go to the GPUs the library was built for and to
        ``rpc_servers`` (``["host:port", ...]``, upstream's ``ggml-rpc-server`` on other machines),
        split by layer (``split_mode="layer"``), by rows (``"row"``) or kept on ``main_gpu``
        (``"none"``), in ``tensor_split`` proportions. An unreachable RPC server is a ModelLoadError naming
        it, one lost later an RpcServerLostError (docs/scaling.md). (RPC is unauthenticated: private networks only.)

        ``lora`` loads LoRA adapters: ``[(path, scale), ...]`` (a bare path: scale 1.0) or ``{path: scale}``;
        contexts apply them at these scales unless told otherwise (see :meth:`load_lora`).

        ``mmproj`` loads the model's multimodal projector (an mmproj GGUF, llama-server's ``--mmproj``):
        chat messages may then hold images and audio (``supports_vision``, ``supports_audio``). By default
        a model name gets the projector pulled with it (as llama-server's ``-hf``); False loads none.

        Raises ModelLoadError for a missing, empty, truncated or corrupt file, and
        ModelNotFoundError / DownloadError for a name that cannot be fetched. The file's header is
        checked first (mullama.gguf._preflight.preflight): values on which llama.cpp would abort the process
        (a layer count beyond its limit, a NaN norm epsilon, a duplicated token, ...) are refused
        with ModelLoadError naming the key.
        """
        from ..chat._template import load_template
        from ..hub._pull import projector_for, resolve

        template = load_template(chat_template) if chat_template is not None else None
        path = resolve(model)
        projector = projector_for(model, path) if mmproj is None else None if mmproj is False else mmproj
        check_model_file(path)
        placement = DeviceOptions.of(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, split_mode=split_mode,
                                     tensor_split=tensor_split, rpc_servers=rpc_servers)
        library = _library.get()
        preflight(path, vocab_only=vocab_only)
        ffi, lib = library.ffi, library.lib
        params = lib.llama_model_default_params()
        arrays = placement.apply(library, params)  # noqa: F841 (kept alive until the load is done)
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        ptr = lib.llama_model_load_from_file(os.fsencode(path), params)
        relays = placement.relays_after_load(library, ptr)  # RpcServerLostError if a server went away
        if ptr == ffi.NULL:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: the file is truncated, corrupt, or uses an architecture "
                "this llama.cpp build does not know. Download it again (`mullama pull` re-verifies), and "
                "enable logging for 'mullama.llama_cpp' to see llama.cpp's reason."
            )
        loaded = cls(library, ptr, path, offloaded=placement.offloads(library), vocab_only=bool(vocab_only),
                     chat_template=template)
        loaded._relays = relays
        try:
            if lora is not None:
                from ._lora import _entries

                for adapter, scale in _entries(lora):
                    loaded.load_lora(adapter, scale)
            if projector is not None:
                from ._media import Projector

                loaded.projector = Projector(loaded, projector)
        except BaseException:
            loaded.close()
            raise
        return loaded

    def load_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
        """Load the LoRA adapter GGUF at ``path`` (once per path) with default ``scale``; it joins
        ``model.lora``. LoraLoadError (``LORA_LOAD_ERROR``, a ModelLoadError) when llama.cpp refuses the file."""
        from ._lora import load_adapter

        self.ensure_open()
        return load_adapter(self, path, scale)

    def close(self) -> None:
        """Free the weights. Refused while a Context of this model is open. Afterwards every method and
        property that needs the C model raises ClosedError."""
        with self._embed_lock:
            embedders, self._embedders = list(self._embedders.values()), {}
        for embedder in embedders:
            embedder.close()
        with self._lock:
            open_contexts = [c for c in self._contexts if not c.closed and c is not self]
            if open_contexts:
                raise ContextError(f"{len(open_contexts)} context(s) still use this model; close them first.")
            if self.projector is not None:
                self.projector.close()
                self.projector = None
            if self.lora and self._ptr is not None:
                from ._lora import free_adapters

                free_adapters(self)
            super().close()
            self._pieces = {}  # so that _token_info misses, and token_to_piece raises ClosedError
        give_back_memory()  # the weights' and their contexts' heap pages, kept by glibc otherwise

    def _register(self, context: Any) -> None:
        with self._lock:
            self.ensure_open()
            self._contexts.add(context)

    # --- facts ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return cast("int", self._library.lib.llama_vocab_n_tokens(self._vocab_ptr()))

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with."""
        return cast("int", self._library.lib.llama_model_n_ctx_train(self.ptr))

    @property
    def n_embd(self) -> int:
        """The length of this model's embedding vectors."""
        return cast("int", self._library.lib.llama_model_n_embd_out(self.ptr))

    @property
    def pooling(self) -> str | None:
        """The pooling the GGUF asks for embeddings (``"mean"``, ``"cls"``, ``"last"``, ``"none"``,
        ``"rank"`` for rerankers), or None when it names none (generative models)."""
        from ._embed import pooling_name

        value = self._arch_meta("pooling_type")
        if value is None or not value.lstrip("-").isdigit():
            return None
        return "rank" if int(value) == 4 else pooling_name(int(value))

    @property
    def generative(self) -> bool:
        """False for an embedding model (its GGUF names a pooling, as BERT-style encoders do): it has
        no language-model head to sample from, so only :meth:`embed` works."""
        return self.pooling is None

    @property
    def supports_vision(self) -> bool:
        """Whether chat messages may hold images (the model was loaded with a vision projector)."""
        return self.projector is not None and self.projector.supports_vision

    @property
    def supports_audio(self) -> bool:
        """Whether chat messages may hold audio (the model was loaded with an audio projector)."""
        return self.projector is not None and self.projector.supports_audio

    @property
    def n_params(self) -> int:
        return cast("int", self._library.lib.llama_model_n_params(self.ptr))

    @property
    def size_bytes(self) -> int:
        return cast("int", self._library.lib.llama_model_size(self.ptr))

    @property
    def description(self) -> str:
        buf = self._ffi.new("char[]", 256)
        self._library.lib.llama_model_desc(self.ptr, buf, 256)
        return cast("str", self._ffi.string(buf).decode("utf-8", "replace"))

    @property
    def bos_token_id(self) -> int:
        return cast("int", self._library.lib.llama_vocab_bos(self._vocab_ptr()))

    @property
    def eos_token_id(self) -> int:
        return cast("int", self._library.lib.llama_vocab_eos(self._vocab_ptr()))

    @property
    def add_bos(self) -> bool:
        """Whether tokenising with ``add_special=True`` prepends BOS."""
        return bool(self._library.lib.llama_vocab_get_add_bos(self._vocab_ptr()))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template: the one given to :meth:`load`, else the GGUF's own
        (``tokenizer.chat_template``), if it has one."""
        if self._chat_template is not None:
            self.ensure_open()
            return self._chat_template
        ptr = self._library.lib.llama_model_chat_template(self.ptr, self._ffi.NULL)
        return None if ptr == self._ffi.NULL else self._ffi.string(ptr).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                            template: str | os.PathLike[str] | None = None, tools: list[dict[str, Any]] | None = None,
                            **variables: Any) -> str:
        """The prompt text for ``messages``, rendered with the model's own chat template
        (or ``template``: Jinja text or a file) exactly as upstream llama.cpp renders it.
        ``tools`` (OpenAI's function tools) reach the template as llama-server passes them;
        messages may hold assistant ``tool_calls`` and ``tool`` results. Extra ``variables``
        (``enable_thinking``, ...) reach the template. Tokenise the result with ``parse_special=True``."""
        from ..chat._template import load_template, render_chat_template
        from ..chat._tools import check_tools

        source = load_template(template) if template is not None else self.chat_template
        if tools:
            variables["tools"] = check_tools(tools)
        if source is None:
            raise TemplateError("this model has no chat template (a base model): give one with chat_template=... "
                                "(Jinja text or a .jinja file, to Model.load or chat_stream; apply_chat_template "
                                "takes template=...), or complete plain text with generate_stream().")
        lib = self._library.lib
        vocab = self._vocab_ptr()
        return render_chat_template(
            source, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(lib.llama_vocab_bos(vocab)),
            eos_token=self._special_text(lib.llama_vocab_eos(vocab)),
            strip_bos=self.add_bos, strip_eos=bool(lib.llama_vocab_get_add_eos(vocab)), **variables)

    def _special_text(self, token: int) -> str:
        if token < 0:  # LLAMA_TOKEN_NULL: the vocabulary has no such token
            return ""
        return self.token_to_piece(token, special=True).decode("utf-8", "replace")

    @property
    def metadata(self) -> dict[str, str]:
        """Every GGUF key/value (arrays abbreviated by llama.cpp), as strings."""
        lib, ffi, ptr = self._library.lib, self._ffi, self.ptr
        result = {}
        size = 1024
        buf = ffi.new("char[]", size)
        for index in range(lib.llama_model_meta_count(ptr)):
            lib.llama_model_meta_key_by_index(ptr, index, buf, size)
            key = ffi.string(buf).decode("utf-8", "replace")
            needed = lib.llama_model_meta_val_str_by_index(ptr, index, buf, size)
            if needed >= size:
                size = needed + 1
                buf = ffi.new("char[]", size)
                lib.llama_model_meta_val_str_by_index(ptr, index, buf, size)
            result[key] = ffi.string(buf).decode("utf-8", "replace")
        return result

    def _meta(self, key: str) -> str | None:
        """One GGUF metadata value as a string, or None when the file has no such key."""
        ffi, lib = self._ffi, self._library.lib
        buf = ffi.new("char[]", 256)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, 256)
        if n < 0:
            return None
        if n >= 256:
            buf = ffi.new("char[]", n + 1)
            lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return cast("str | None", ffi.string(buf).decode("utf-8", "replace"))

    def _arch_meta(self, key: str) -> str | None:
        """The metadata value ``<architecture>.<key>`` (e.g. ``llama.context_length``), or None."""
        return self._meta(f"{self._meta('general.architecture')}.{key}")

    # --- embeddings -----------------------------------------------------------
    def embed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], *, pooling: str | None = None,
              normalize: bool = True, batch_size: int | None = None, truncate: bool = False,
              as_numpy: bool = False) -> Any:
        """Embedding vectors of ``texts`` (a str or a list of them; or lists of token ids): a list of
        float lists, one per text, in order.

        ``pooling`` is the GGUF's (``model.pooling``), or mean for generative models that name none;
        ``"mean"``, ``"cls"``, ``"last"`` override it, and ``"none"`` gives a list of per-token
        vectors for each text. Vectors have unit length unless ``normalize=False``. Texts are
        tokenised as llama-server does (special tokens added and parsed). ``batch_size`` (default
        512) is the embedding context's size: the longest text it takes; a longer one raises
        ContextOverflowError naming its index, or is cut to its beginning with ``truncate=True``.
        ``as_numpy=True`` returns one float32 array (texts x ``n_embd``) instead.

        Short texts share decodes (and threads embedding at the same time share them too), in
        groups chosen so that every vector equals the one llama-server computes for its text
        alone (see mullama.generate._embed).
        """
        from ._embed import embed

        return embed(self, texts, pooling=pooling, normalize=normalize, batch_size=batch_size,
                     truncate=truncate, as_numpy=as_numpy)

    def embed_one(self, text: str, **options: Any) -> list[float]:
        """The embedding of one text (options as :meth:`embed`)."""
        if not isinstance(text, str):
            raise InvalidConfigError(f"embed_one() takes a str, not {type(text).__name__}.")
        result: list[float] = self.embed([text], **options)[0]
        return result

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None, normalize: bool = False,
               batch_size: int | None = None, truncate: bool = False) -> list[Ranked]:
        """``documents`` ranked by relevance to ``query``, most relevant first (at most ``top_n``):
        each a ``Ranked(index, score, document)``. Needs a reranker (``model.pooling == "rank"``;
        another model is an InvalidConfigError). Scores are llama-server ``--rerank``'s: the
        classification head's raw output, or with ``normalize=True`` its logistic in (0, 1).
        ``batch_size`` and ``truncate`` bound a (query, document) pair as :meth:`embed` bounds a
        text (see mullama.generate._rerank)."""
        from ._rerank import rerank

        return rerank(self, query, documents, top_n=top_n, normalize=normalize, batch_size=batch_size,
                      truncate=truncate)

    def _embedder(self, pooling: int, batch_size: int) -> Embedder:
        """The embedding context for ``pooling`` and ``batch_size``, created on first use."""
        from ._embed import Embedder

        key = (pooling, batch_size)
        with self._embed_lock:
            self.ensure_open()
            embedder = self._embedders.get(key)
            if embedder is None or embedder.closed:
                embedder = self._embedders[key] = Embedder(self, pooling, batch_size)
            return embedder

    def _vocab_ptr(self) -> Any:
        self.ensure_open()
        return self._vocab

    # --- tokens ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids. ``add_special`` adds BOS/EOS as the model wants;
        ``parse_special`` turns special-token text such as ``<|im_start|>`` into its token."""
        if not isinstance(text, str):
            raise TokenizeError(f"tokenize() takes a str, not {type(text).__name__}.")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TokenizeError(f"the text is not valid Unicode ({exc.reason} at {exc.start}); "
                                "remove lone surrogates before tokenising.") from None
        if len(data) >= 2**31 - 1:
            raise TokenizeError("the text is too long to tokenise (2 GiB or more).")
        lib, ffi = self._library.lib, self._ffi
        vocab = self._vocab_ptr()
        capacity = len(data) + 8
        tokens = ffi.new("llama_token[]", capacity)
        count = lib.llama_tokenize(vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            tokens = ffi.new("llama_token[]", capacity)
            count = lib.llama_tokenize(vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            raise TokenizeError("llama.cpp could not tokenise the text.")
        return cast("list[int]", ffi.unpack(tokens, count))

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a multi-byte character)."""
        buf = self._ffi.new("char[]", 64)
        return self._piece(token, buf, 64, special)

    def _cached_piece(self, token: int) -> bytes:
        """token_to_piece(special=False), from a cache after the first time."""
        return self._token_info(token)[0]

    def _token_info(self, token: int) -> TokenInfo:
        """What the streaming hot path needs of a token, found once and then one dict lookup: its
        bytes (special=False), their text when they are whole UTF-8 characters (else None), and
        whether it ends generation. close() empties the cache, so that a closed model raises
        ClosedError."""
        info = self._pieces.get(token)
        if info is None:
            piece = self.token_to_piece(token)
            try:
                text: str | None = piece.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            info = self._pieces[token] = (piece, text, self.is_eog(token))
        return info

    def _piece(self, token: int, buf: Any, size: int, special: bool) -> bytes:
        """token_to_piece into a caller-owned buffer (no allocation on the hot path)."""
        self._check_token(token)  # llama.cpp throws (aborting the process) on an id out of range
        n = self._library.lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
        if n < 0:
            bigger = self._ffi.new("char[]", -n)
            n = self._library.lib.llama_token_to_piece(self._vocab, token, bigger, -n, 0, special)
            return cast("bytes", self._ffi.unpack(bigger, n))
        return cast("bytes", self._ffi.unpack(buf, n))

    def detokenize(self, tokens: Iterable[int], *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """Token ids to text, exactly as llama.cpp joins them."""
        tokens = self._check_tokens(tokens)
        lib, ffi = self._library.lib, self._ffi
        vocab = self._vocab_ptr()
        array = ffi.new("llama_token[]", tokens) if tokens else ffi.NULL
        capacity = max(64, 8 * len(tokens))
        buf = ffi.new("char[]", capacity)
        n = lib.llama_detokenize(vocab, array, len(tokens), buf, capacity, remove_special, unparse_special)
        if n < 0:
            capacity = -n
            buf = ffi.new("char[]", capacity)
            n = lib.llama_detokenize(vocab, array, len(tokens), buf, capacity, remove_special, unparse_special)
        return cast("str", ffi.unpack(buf, n).decode("utf-8", "replace"))

    def eog_tokens(self) -> tuple[int, ...]:
        """Every token that ends generation (EOS, EOT, <|im_end|>, ...), as upstream lists them to ban
        them under ``ignore_eos``."""
        if self._eog is None:
            lib, vocab = self._library.lib, self._vocab_ptr()
            self._eog = tuple(token for token in range(self.vocab_size) if lib.llama_vocab_is_eog(vocab, token))
        return self._eog

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        self._check_token(token)
        return bool(self._library.lib.llama_vocab_is_eog(self._vocab, token))

    def _check_token(self, token: int) -> None:
        """ClosedError after close(); InvalidConfigError for a token id that is not an int, TokenizeError
        for one that is not one of the vocabulary's."""
        if self._ptr is None:
            raise ClosedError(f"this {self._kind} is closed; create a new one to go on.")
        check_token_id(token, self._n_vocab)

    def _check_tokens(self, tokens: Iterable[int]) -> list[int]:
        """``tokens`` as a list, each checked as ``_check_token`` checks one."""
        self.ensure_open()
        return check_token_ids(tokens, self._n_vocab)

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.description
        return f"<mullama.Model {self.path.name} ({state})>"


def check_prompt(prompt: Any) -> str:
    """``prompt``, when it is text; a clear error otherwise."""
    if not isinstance(prompt, str):
        raise InvalidConfigError(f"the prompt must be a str, not {type(prompt).__name__}.")
    return prompt


def tokenize_prompt(model: Model, prompt: str) -> list[int]:
    """A prompt's tokens as upstream's server and tools make them: BOS/EOS as the model wants,
    special-token text (a chat template's markers) parsed. The one place a prompt becomes tokens."""
    return model.tokenize(check_prompt(prompt), add_special=True, parse_special=True)
