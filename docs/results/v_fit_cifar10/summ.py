import json, sys, statistics as st
rows=[json.loads(l) for l in open(sys.argv[1])]
n=int(sys.argv[2]) if len(sys.argv)>2 else 50
for i in range(0,len(rows),n):
    c=rows[i:i+n]
    f=lambda k: st.mean(r[k] for r in c if k in r) if any(k in r for r in c) else float('nan')
    g=[r for r in c if 'g_rec' in r]
    print(i, 'vgain %.4f pre %.4f post %.4f logvar %.3f min_mi %.4f nce %.1f rec %.3f lstd %.3f'%(f('v_gain'),f('pre'),f('post'),f('logvar'),f('min_mi'),f('nce_acc'),f('rec'),f('latent_std')), 'gate %.2f'%f('club_gate') if any('club_gate' in r for r in c) else '', g and ' '.join('%s=%.4f'%(k[2:],g[0][k]) for k in g[0] if k.startswith('g_')))
