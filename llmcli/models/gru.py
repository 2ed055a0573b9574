"""A GRU language model (embedding -> nn.GRU -> linear head) as a Transformers architecture.

`model_type: gru`. `GRUForCausalLM` trains with the causal-LM loss and generates with
`model.generate` (greedy, sampling, beam, batched, left-padded); `GRUForSequenceClassification`
classifies from the hidden state at the last real token. Register with `llmcli.models.register()`.

    llmcli pretrain --config configs/shakespeare-gru.yaml

Padding: wherever `attention_mask` is 0 the GRU does not step; the hidden state is carried through
the pad position unchanged. So a left-padded prompt gives the same states and logits as the prompt
alone, and the state after the last real token sits at the last position whatever the padding side.
The GRU's hidden state is the generation cache (`GRUCache`): with it, each new token costs one step.

Packed rows (`data.packing`): given `position_ids` that restart at 0 where a row starts, and no
attention mask or cache (as Transformers detects packed rows for attention), the state is reset at
each row start, so every row is computed as if it were alone.

To write your own architecture, copy this file: a config with its own `model_type`, a
`PreTrainedModel` base with `_init_weights`, the heads, and `AUTO_CLASSES` at the bottom.
"""

import math
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

# The outputs' cache field: `cache` from Transformers 5.24 (which passes `cache=` to forward), `past_key_values` before
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@strict
class GRUConfig(PreTrainedConfig):
    """Configuration of a GRU language model / classifier.

    vocab_size: rows of the embedding and the LM head.
    hidden_size: the embedding width and the GRU's hidden units (equal, so the head can be tied).
    num_layers: stacked GRU layers.
    dropout: on the embeddings, between GRU layers and on the top layer's output (training only).
    max_position_embeddings: the default window for training blocks and eval. A GRU has no hard
        context limit (no position embeddings); llmcli reads this name, as it does for GPT-2/BERT,
        only to pick default windows.
    tie_word_embeddings: share the embedding matrix with the LM head.
    """

    model_type = "gru"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # Trainer's eval must not gather the cache
    attribute_map = {"num_hidden_layers": "num_layers"}
    # `max_position_embeddings` is a default window, not a limit: longer blocks and prompts are fine.
    context_is_a_limit: ClassVar[bool] = False

    vocab_size: int = 10000
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float | int = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.05
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def validate_architecture(self):
        """Part of `@strict` validation."""
        for key in ("vocab_size", "hidden_size", "num_layers", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# --------------------------------------------------------------------------------------------
# The cache: one hidden state per GRU layer


class GRUStateLayer(LinearAttentionCacheLayerMixin):
    """One GRU layer's cache: its hidden state, (batch, hidden_size), as recurrent state 0.

    Transformers' linear-attention cache layer, without the convolution state (a GRU has none);
    the base class supplies beam-search reordering, offloading and reset.
    """

    is_compileable = False  # the state tensor is replaced each step, not updated in place

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
        self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states, state_idx: int = 0):
        raise NotImplementedError("a GRU layer has no convolution state")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i, state in self.recurrent_states.items():
            if state is not None:
                self.recurrent_states[i] = state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for i, state in self.recurrent_states.items():
            if state is not None:
                self.recurrent_states[i] = state[indices, ...]


class GRUCache(Cache):
    """The generation cache of a GRU: the hidden state of every layer after the tokens seen so far."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[GRUStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_states(self) -> torch.Tensor | None:
        """(num_layers, batch, hidden) as nn.GRU takes it, or None before the first forward."""
        if not self.has_previous_state():
            return None
        return torch.stack([self.get_recurrent_state(i) for i in range(len(self.layers))])

    def update_states(self, states: torch.Tensor, num_tokens: int) -> None:
        for i in range(len(self.layers)):
            self.update_recurrent_state(states[i], i)
        self.seen_tokens += num_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


# --------------------------------------------------------------------------------------------
# Models


class GRUPreTrainedModel(PreTrainedModel):
    config_class = GRUConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _skip_keys_device_placement = ["past_key_values", "cache"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Embedding and linear layers: normal(0, initializer_range) (the base class); GRU weights:
        PyTorch's own uniform(-1/sqrt(hidden), 1/sqrt(hidden))."""
        super()._init_weights(module)
        if isinstance(module, nn.GRU):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)


class GRUModel(GRUPreTrainedModel):
    """Embedding -> dropout -> nn.GRU -> dropout; the states of the top layer."""

    def __init__(self, config: GRUConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden_size, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                          dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: GRUCache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                past_key_values: GRUCache | None = None, position_ids: torch.LongTensor | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """`attention_mask` (batch, seq) or (batch, past + seq) marks real tokens (1) and padding (0);
        with a `cache` only the new tokens are passed and the GRU starts from the cached state.
        (`past_key_values` is the same cache under the name Transformers used before 5.24.)"""
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_hidden_states:
            raise ValueError("GRUModel returns only the top layer's states (nn.GRU does not expose the others)")
        if past_key_values is not None and not isinstance(past_key_values, GRUCache):
            raise TypeError(f"a GRU's cache is a GRUCache, not {type(past_key_values).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.dropout(x)
        seq_len = x.shape[1]
        h0 = past_key_values.get_states() if past_key_values is not None else None
        mask = attention_mask[:, -seq_len:] if attention_mask is not None else None
        if position_ids is not None and attention_mask is None and past_key_values is None and bool((position_ids[:, 1:] == 0).any()):
            out = self.dropout(self._packed_gru(x, position_ids))  # several rows per sequence: no state to cache
            return BaseModelOutputWithPast(last_hidden_state=out, **{CACHE_FIELD: None})
        if mask is None or bool(mask.all()):
            out, h_n = self.gru(x, h0)
        else:
            out, h_n = self._masked_gru(x, mask.bool(), h0)
        out = self.dropout(out)
        if use_cache:
            if past_key_values is None:
                past_key_values = GRUCache(self.config.num_layers)
            past_key_values.update_states(h_n, seq_len)
        return BaseModelOutputWithPast(last_hidden_state=out, **{CACHE_FIELD: past_key_values if use_cache else None})

    def _packed_gru(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run each packed row from a zero state: a row starts where its position id is 0 and its tokens are
        positions 0, 1, ... Rows are moved to a batch of their own (row r, position p), packed, and gathered back."""
        if not bool((position_ids[:, 0] == 0).all()):
            raise ValueError("packed position_ids must start each sequence with a row start (0)")
        starts = position_ids == 0
        counts = starts.sum(1)
        row = starts.long().cumsum(1) - 1 + (counts.cumsum(0) - counts).unsqueeze(1)  # each token's row, over the batch
        lengths = torch.bincount(row.flatten(), minlength=int(counts.sum()))
        compact = x.new_zeros(len(lengths), int(lengths.max()), x.shape[-1])
        compact = compact.index_put((row.flatten(), position_ids.flatten()), x.reshape(-1, x.shape[-1]))
        packed = pack_padded_sequence(compact, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=compact.shape[1])
        return out[row, position_ids]

    def _masked_gru(self, x: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor | None):
        """Run the GRU over the real tokens only; a pad position outputs the state carried into it.

        The real tokens of each row are moved to the front (in order) and packed, so nn.GRU steps
        each row exactly its length; outputs are then gathered back to the original positions.
        """
        batch, seq_len, width = x.shape
        positions = torch.arange(seq_len, device=x.device)
        order = torch.argsort(torch.where(mask, positions, positions + seq_len), dim=1)
        compact = x.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
        lengths = mask.sum(1)
        packed = pack_padded_sequence(compact, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_out, h_n = self.gru(packed, h0)
        compact_out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=seq_len)
        if h0 is None:
            h0 = x.new_zeros(self.config.num_layers, batch, self.config.hidden_size)
        h_n = torch.where((lengths == 0).view(1, -1, 1), h0, h_n)  # a row with no real token keeps its state
        last_real = mask.long().cumsum(1) - 1  # index (in compact) of the last real token at or before each position
        out = compact_out.gather(1, last_real.clamp(min=0).unsqueeze(-1).expand(-1, -1, compact_out.shape[-1]))
        out = torch.where((last_real < 0).unsqueeze(-1), h0[-1].unsqueeze(1), out)
        return out, h_n


class GRUForCausalLM(GRUPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GRUConfig):
        super().__init__(config)
        self.model = GRUModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache (key/value layers); the first forward makes a GRUCache
        return False

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: GRUCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: GRUCache | None = None,
                position_ids: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """`labels` are the input ids (shifted inside, -100 ignored), as for GPT-2; `position_ids` mark packed rows."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
                             output_hidden_states=kwargs.pop("output_hidden_states", None))
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})


class GRUForSequenceClassification(GRUPreTrainedModel):
    """Pooled head: the top-layer state after the last real token (padding on either side)."""

    def __init__(self, config: GRUConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = GRUModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None and input_ids is not None and self.config.pad_token_id is not None:
            # no mask: as GPT-2 does, the last token that is not padding ends each sequence
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (positions * (input_ids != self.config.pad_token_id)).argmax(-1)
            attention_mask = positions.unsqueeze(0) <= last.unsqueeze(1)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False)
        # pad positions carry the state forward, so the last position holds the state after the last real token
        logits = self.score(outputs.last_hidden_state[:, -1])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# What llmcli.models.register() adds to the Auto classes.
AUTO_CLASSES = {
    "AutoConfig": GRUConfig,
    "AutoModel": GRUModel,
    "AutoModelForCausalLM": GRUForCausalLM,
    "AutoModelForSequenceClassification": GRUForSequenceClassification,
}
