// GPT-2 style byte-level BPE with the vocabulary and merges stored in the GGUF metadata
// (tokenizer.ggml.tokens / .merges / .token_type), and the SmolLM pre-tokenizer: every digit
// is its own piece, then the GPT-2 split (contractions, letters, numbers, other, spaces).
#pragma once
#include <string>
#include <unordered_map>
#include <vector>

namespace defkv_engine {

class GgufFile;

class Tokenizer {
public:
    bool load(const GgufFile &f, std::string *error);
    // parse_special: recognise control tokens such as <|im_start|> written in the text.
    std::vector<int> encode(const std::string &text, bool parse_special) const;
    std::string decode(int token) const;
    std::string decode(const std::vector<int> &tokens) const;
    int token_id(const std::string &tok) const;  // -1 if absent
    int vocab_size() const { return (int)tokens_.size(); }
    int eos = 2, bos = 1;

private:
    void bpe_piece(const std::string &piece, std::vector<int> *out) const;
    std::vector<std::string> tokens_;
    std::vector<int> types_;
    std::unordered_map<std::string, int> token_to_id_;
    std::unordered_map<std::string, int> merge_rank_;
    std::vector<std::string> specials_;   // control tokens, longest first
    std::string byte_to_unicode_[256];    // UTF-8 of the mapped code point
    std::unordered_map<uint32_t, unsigned char> unicode_to_byte_;
    mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

}  // namespace defkv_engine
