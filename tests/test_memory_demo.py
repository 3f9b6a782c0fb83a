from ndm_seq.memory import __main__ as demo


def test_demo_memory_learns_to_decompose(capsys):
    demo.main(["--steps", "200", "--latent-dim", "16"])
    out = capsys.readouterr().out
    before = float(out.split("before  relative ||z - z'||: ")[1].split()[0])
    after = float(out.split("after   relative ||z - z'||: ")[1].split()[0])
    # Collinear slots at init recover little of z; trained slots span its subspace.
    assert before > 0.5
    assert after < before / 10
