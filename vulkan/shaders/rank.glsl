// The ranking key of element e for sel_keys and sel_mark (PcKeys, push.h): the score bits,
// the tier (absent: TIER_NORMAL) and, where a bad flag array is given, TIER_BAD for bad entries.
// Needs bindings x (scores), t (tiers), f (bad flags) and the byte loaders tier_at, flag_at.
uvec2 key_of(uint e) {
    uint tier = pc.has_tier != 0u ? tier_at(pc.t_base + e) : DEFKV_TIER_NORMAL;
    if (pc.has_bad != 0u && flag_at(pc.f_base + e) != 0u) tier = DEFKV_TIER_BAD;
    return rank_key(pc.rank, x[pc.x_base + e], tier, e);
}
uint elem_of(uint s, uint p) { return pc.per_row != 0u ? s * pc.L + p : p; }
