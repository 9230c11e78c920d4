module github.com/defkv/defkv/bindings/go

go 1.19
