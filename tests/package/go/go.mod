module example.com/defkv-consumer

go 1.19

require github.com/defkv/defkv/bindings/go v0.2.0
