#include "rel_common.h"
static void run(defkv_context*ctx, rel_layer*rl, int m, rel_out*o){ defkv_params p; defkv_params_default(&p); p.method=m; p.compression_ratio=0.5; p.window=8;
  rel_out_init(o, 8, rl->total_entries); defkv_select(ctx,&p,&rl->layer,&o->sel);}
int main(int argc, char**argv){
  rel_spec s = {2, 4, 2, 8, 8, 16, {300, 129}, 0, 0, 3, 11};
  rel_layer hm; rel_layer_init(&hm,&s); s.token_major=1; rel_layer tm; rel_layer_init(&tm,&s);
  defkv_context *c[3] = {rel_context(1), rel_context(2), rel_context(4)};
  int m = atoi(argv[1]);
  rel_out ref; run(c[0], &hm, m, &ref);
  for(int it=0; it<30; it++) for(int ci=0; ci<3; ci++) for(int l=0;l<2;l++){ rel_out o; run(c[ci], l?&tm:&hm, m, &o);
    int nd=0, first=-1; for(int i=0;i<hm.total_entries;i++) if(memcmp(&o.scores[i],&ref.scores[i],4)) {nd++; if(first<0) first=i;}
    int kd = memcmp(o.keep_mask, ref.keep_mask, hm.total_entries)!=0;
    if(nd||kd) printf("it %d ctx %d layout %d: %d score diffs (first %d: %.9g vs %.9g) keepdiff %d\n", it, ci, l, nd, first, first>=0?o.scores[first]:0, first>=0?ref.scores[first]:0, kd);
    rel_out_free(&o);}
}
