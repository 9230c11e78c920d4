#include "tokenizer.hpp"

#include <algorithm>
#include <climits>

#include "gguf.hpp"

namespace defkv_engine {

namespace {

std::string utf8_encode(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += (char)cp;
    } else if (cp < 0x800) {
        s += (char)(0xc0 | (cp >> 6));
        s += (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        s += (char)(0xe0 | (cp >> 12));
        s += (char)(0x80 | ((cp >> 6) & 0x3f));
        s += (char)(0x80 | (cp & 0x3f));
    } else {
        s += (char)(0xf0 | (cp >> 18));
        s += (char)(0x80 | ((cp >> 12) & 0x3f));
        s += (char)(0x80 | ((cp >> 6) & 0x3f));
        s += (char)(0x80 | (cp & 0x3f));
    }
    return s;
}

// Decodes one UTF-8 code point at s[i]; invalid bytes come back as themselves, length 1.
uint32_t utf8_next(const std::string &s, size_t i, size_t *len) {
    const unsigned char c = (unsigned char)s[i];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) {
        *len = 1;
        return c;
    }
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
    for (int k = 1; k < n; ++k) {
        const unsigned char cc = (unsigned char)s[i + k];
        if ((cc & 0xc0) != 0x80) {
            *len = 1;
            return c;
        }
        cp = (cp << 6) | (cc & 0x3f);
    }
    *len = (size_t)n;
    return cp;
}

// Character classes of the pre-tokenizer. ASCII exactly; beyond ASCII an approximation
// (general punctuation and Latin-1 symbols are "other", the rest letters), enough for
// English text.
enum CharClass { C_LETTER, C_DIGIT, C_SPACE, C_OTHER };
CharClass classify(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return C_LETTER;
        if (cp >= '0' && cp <= '9') return C_DIGIT;
        if (cp == ' ' || (cp >= 9 && cp <= 13)) return C_SPACE;
        return C_OTHER;
    }
    if (cp == 0x85 || cp == 0xa0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 ||
        cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000)
        return C_SPACE;
    if ((cp >= 0xa1 && cp <= 0xbf && cp != 0xaa && cp != 0xb5 && cp != 0xba) || cp == 0xd7 ||
        cp == 0xf7 || (cp >= 0x2010 && cp <= 0x206f) || (cp >= 0x20a0 && cp <= 0x20cf))
        return C_OTHER;
    return C_LETTER;
}

struct Cp {
    uint32_t cp;
    size_t off, len;
    CharClass cls;
};

// GPT-2 split of one digit-free (or single-digit) segment:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
void gpt2_split(const std::string &text, const std::vector<Cp> &cps, size_t b, size_t e,
                std::vector<std::string> *out) {
    size_t i = b;
    auto emit = [&](size_t from, size_t to) {
        out->push_back(text.substr(cps[from].off, cps[to - 1].off + cps[to - 1].len - cps[from].off));
    };
    while (i < e) {
        if (cps[i].cp == '\'' && i + 1 < e) {
            const uint32_t c1 = cps[i + 1].cp, c2 = i + 2 < e ? cps[i + 2].cp : 0;
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                emit(i, i + 2);
                i += 2;
                continue;
            }
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
                emit(i, i + 3);
                i += 3;
                continue;
            }
        }
        size_t j = i;
        if (cps[j].cp == ' ' && j + 1 < e && cps[j + 1].cls != C_SPACE) ++j;  // optional space
        const CharClass cls = cps[j].cls;
        if (cls != C_SPACE) {
            size_t k = j;
            if (cls == C_OTHER) {
                while (k < e && cps[k].cls == C_OTHER) ++k;
            } else {
                while (k < e && cps[k].cls == cls) ++k;
            }
            emit(i, k);
            i = k;
            continue;
        }
        // Whitespace run: \s+(?!\S) leaves the last space for the following word.
        size_t k = i;
        while (k < e && cps[k].cls == C_SPACE) ++k;
        if (k < e && k - i > 1) {
            emit(i, k - 1);
            i = k - 1;
        } else {
            emit(i, k);
            i = k;
        }
    }
}

}  // namespace

bool Tokenizer::load(const GgufFile &f, std::string *error) {
    const GgufValue *toks = f.find("tokenizer.ggml.tokens");
    const GgufValue *merges = f.find("tokenizer.ggml.merges");
    const GgufValue *types = f.find("tokenizer.ggml.token_type");
    if (!toks || toks->strs.empty() || !merges || merges->strs.empty()) {
        *error = "the model has no BPE tokenizer (tokenizer.ggml.tokens/merges missing)";
        return false;
    }
    if (f.get_str("tokenizer.ggml.model", "") != "gpt2") {
        *error = "tokenizer model '" + f.get_str("tokenizer.ggml.model", "") + "' is not supported (gpt2 only)";
        return false;
    }
    tokens_ = toks->strs;
    types_.assign(tokens_.size(), 1);
    if (types && types->nums.size() == tokens_.size())
        for (size_t i = 0; i < tokens_.size(); ++i) types_[i] = (int)types->nums[i];
    for (size_t i = 0; i < tokens_.size(); ++i) {
        token_to_id_.emplace(tokens_[i], (int)i);
        if (types_[i] == 3) specials_.push_back(tokens_[i]);  // CONTROL
    }
    std::sort(specials_.begin(), specials_.end(),
              [](const std::string &a, const std::string &b) { return a.size() > b.size(); });
    for (size_t i = 0; i < merges->strs.size(); ++i) merge_rank_.emplace(merges->strs[i], (int)i);
    eos = (int)f.get_num("tokenizer.ggml.eos_token_id", 2);
    bos = (int)f.get_num("tokenizer.ggml.bos_token_id", 1);
    // GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    int n = 0;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        const uint32_t cp = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        byte_to_unicode_[b] = utf8_encode(cp);
        unicode_to_byte_[cp] = (unsigned char)b;
    }
    return true;
}

int Tokenizer::token_id(const std::string &tok) const {
    auto it = token_to_id_.find(tok);
    return it == token_to_id_.end() ? -1 : it->second;
}

void Tokenizer::bpe_piece(const std::string &piece, std::vector<int> *out) const {
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
        out->insert(out->end(), it->second.begin(), it->second.end());
        return;
    }
    std::vector<std::string> sym;
    for (unsigned char c : piece) sym.push_back(byte_to_unicode_[c]);
    while (sym.size() > 1) {
        int best = INT_MAX;
        size_t at = 0;
        for (size_t i = 0; i + 1 < sym.size(); ++i) {
            auto m = merge_rank_.find(sym[i] + " " + sym[i + 1]);
            if (m != merge_rank_.end() && m->second < best) {
                best = m->second;
                at = i;
            }
        }
        if (best == INT_MAX) break;
        sym[at] += sym[at + 1];
        sym.erase(sym.begin() + (long)at + 1);
    }
    std::vector<int> ids;
    for (const std::string &s : sym) {
        int id = token_id(s);
        if (id >= 0) {
            ids.push_back(id);
        } else {  // not in the vocabulary: fall back to one token per byte
            size_t i = 0;
            while (i < s.size()) {
                size_t len;
                uint32_t cp = utf8_next(s, i, &len);
                int bid = token_id(utf8_encode(cp));
                if (bid >= 0) ids.push_back(bid);
                i += len;
            }
        }
    }
    if (cache_.size() < 200000) cache_.emplace(piece, ids);
    out->insert(out->end(), ids.begin(), ids.end());
}

std::vector<int> Tokenizer::encode(const std::string &text, bool parse_special) const {
    std::vector<int> out;
    size_t start = 0;
    while (start < text.size()) {
        // Next special token (if asked for) bounds the ordinary segment.
        size_t seg_end = text.size(), sp_len = 0;
        int sp_id = -1;
        if (parse_special) {
            for (const std::string &sp : specials_) {
                size_t p = text.find(sp, start);
                if (p != std::string::npos && (p < seg_end || (p == seg_end && sp.size() > sp_len))) {
                    seg_end = p;
                    sp_len = sp.size();
                    sp_id = token_id(sp);
                }
            }
        }
        if (seg_end > start) {
            const std::string seg = text.substr(start, seg_end - start);
            std::vector<Cp> cps;
            for (size_t i = 0; i < seg.size();) {
                size_t len;
                uint32_t cp = utf8_next(seg, i, &len);
                cps.push_back({cp, i, len, classify(cp)});
                i += len;
            }
            // First split: every digit alone (\p{N}); then GPT-2 on the rest.
            std::vector<std::string> pieces;
            size_t i = 0;
            while (i < cps.size()) {
                if (cps[i].cls == C_DIGIT) {
                    pieces.push_back(seg.substr(cps[i].off, cps[i].len));
                    ++i;
                    continue;
                }
                size_t j = i;
                while (j < cps.size() && cps[j].cls != C_DIGIT) ++j;
                gpt2_split(seg, cps, i, j, &pieces);
                i = j;
            }
            for (const std::string &p : pieces) bpe_piece(p, &out);
        }
        if (sp_id >= 0) out.push_back(sp_id);
        start = seg_end + sp_len;
    }
    return out;
}

std::string Tokenizer::decode(int token) const {
    if (token < 0 || token >= (int)tokens_.size()) return "";
    const std::string &t = tokens_[token];
    if (types_[token] == 3) return t;
    std::string out;
    for (size_t i = 0; i < t.size();) {
        size_t len;
        uint32_t cp = utf8_next(t, i, &len);
        auto it = unicode_to_byte_.find(cp);
        if (it != unicode_to_byte_.end()) out += (char)it->second;
        else out += t.substr(i, len);
        i += len;
    }
    return out;
}

std::string Tokenizer::decode(const std::vector<int> &tokens) const {
    std::string s;
    for (int t : tokens) s += decode(t);
    return s;
}

}  // namespace defkv_engine
